"""The Python side of the detectors: validate and coerce, mask NaN, call the kernels, grow state.

    detectors = Detectors(params, kind_of=catalogue_kind, range_of=declared_range, relations=RELATIONS)
    batch = detectors.score_readings(readings, now_ms)   # the one entry point for a batch
    batch.scores, batch.reasons                           # per reading, in the order given
    snapshot = detectors.snapshot(); detectors.restore(snapshot)   # exact, for checkpoints
    detectors.evict_silent(now_ms, after_ms)              # forget series silent that long (event time)

Each series' kind (how it is judged: kernels.MEASURED, STATE_CODE or SWITCHED) comes from one
place, `kind_of(key)`, given once: applied to a series when it is first seen and to every series
of a restored checkpoint (today's catalogue wins over the one the checkpoint was saved under).
Lower level, for tests and benchmarks: `series_ids(keys)` and `score(ids, ts_ms, values)`.

`relations` (kota.contract.RELATIONS): pairs of a device's metrics judged together. A batch's
readings of both metrics of a pair at the same time feed a relation series of their own, keyed
(device, "primary~reference") beside the device's metrics and kept, snapshot and evicted with them;
where the relation scores higher than the primary reading itself, that reading takes its score
(`kernels.INCONSISTENT`). A relation series is never silent on its own (`silence`).

Contract (shared by every detector, tested in tests/test_kernels.py): scores lie in [0, 1], high
means anomalous, 0 until a series is warmed up; the constructor only stores parameters; a
snapshot restored gives the same scores as the original.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from processing import kernels

CACHE_LINE = 64  # bytes
# A checkpoint's blob is deflated at zlib's fastest level: its running means and spreads are about
# half incompressible mantissa, so a higher level saves a few per cent for half as much time again
# (bench.checkpoints prints both). An .npz (a zip) starts with ZIP_MAGIC, a zlib stream never does.
CHECKPOINT_ZLIB_LEVEL = 1
ZIP_MAGIC = b"PK\x03\x04"


def _cache_aligned(array: np.ndarray) -> np.ndarray:
    """`array` copied to memory that starts on a cache line. A series' state row (24 float64, 192
    bytes) then spans three lines, not four: the kernel prefetches each reading's row ahead, and
    NumPy's own allocations start 16 bytes into a line."""
    raw = np.empty(array.nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    aligned = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return aligned


class SeriesReading(Protocol):
    """What `score_readings` reads of a reading (kota.contract.Reading has it)."""

    @property
    def device_id(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def value(self) -> float: ...


# What `BatchScores.found` holds of each reading's series, as the batch found it (before scoring).
FOUND_COLUMNS = (kernels.COUNT, kernels.LAST_TS, kernels.INTERVAL, kernels.LAST_VALUE)
FOUND_COUNT, FOUND_LAST_TS, FOUND_INTERVAL, FOUND_LAST_VALUE = range(len(FOUND_COLUMNS))


class PlainReading(NamedTuple):
    """The least a reading needs to be scored (a SeriesReading), for tests and benchmarks that build
    readings without the wire format's other fields."""

    device_id: str
    metric: str
    ts_ms: int
    value: float


class RelationSpec(Protocol):
    """What the detectors read of a relation (kota.contract.Relation has it)."""

    @property
    def primary(self) -> str: ...
    @property
    def reference(self) -> str: ...
    @property
    def form(self) -> str: ...
    @property
    def series_name(self) -> str: ...


RELATION_FORMS = {"ratio": kernels.RELATION_RATIO, "offset": kernels.RELATION_OFFSET}
RELATION_KINDS = tuple(RELATION_FORMS.values())


class BatchScores(NamedTuple):
    """Scores of a batch of readings, in the order given: series ids, scores in [0, 1], reason codes,
    and each reading's series as the batch found it (`FOUND_COLUMNS`; zeros for a new series), which
    tells a silence that began and ended inside the batch."""

    series: np.ndarray
    scores: np.ndarray
    reasons: np.ndarray
    found: np.ndarray


def _merged(own: float, own_reason: int, pair: float, pair_reason: int, repeat_below: float) -> tuple[float, int]:
    """A primary reading's judgement with its relation's: the higher score, with its reason; but a
    score under `repeat_below` where either said REPEAT is a REPEAT (it holds its alert open)."""
    score, reason = (pair, pair_reason) if pair > own else (own, own_reason)
    if score < repeat_below and kernels.REPEAT in (own_reason, pair_reason):
        reason = kernels.REPEAT
    return score, reason


UNKNOWN_ROLE = -2  # a series' part in relations not looked up yet (Detectors.pairs)


def _any_range(key: Any) -> tuple[float, float]:
    return -np.inf, np.inf


class Detectors:
    """Every detector of `processing.kernels` over many series, with their state, for one stream in order.

    `kind_of(key)`: how a series is judged (kernels.MEASURED, the default; STATE_CODE, on/off/fault,
    which only the range detector judges; SWITCHED, a switched load, judged only while on).
    `range_of(key)`: its declared physical range (low, high), asked when a series is first seen.
    `relations`: pairs of a device's metrics judged together (the module's docstring).
    """

    def __init__(
        self,
        params: np.ndarray | None = None,
        *,
        kind_of: Callable[[Any], float] | None = None,
        range_of: Callable[[Any], tuple[float, float]] | None = None,
        relations: Iterable[RelationSpec] = (),
        initial_series: int = 1024,
    ) -> None:
        self.params = np.ascontiguousarray(kernels.DEFAULT_PARAMS if params is None else params, dtype=np.float64)
        if self.params.shape != kernels.DEFAULT_PARAMS.shape:
            raise ValueError(f"params must have {kernels.DEFAULT_PARAMS.shape[0]} entries")
        self._kind_of = kind_of
        self._range_of = range_of or _any_range
        self._relations = tuple(relations)
        unknown = {r.form for r in self._relations} - RELATION_FORMS.keys()
        if unknown:
            raise ValueError(f"unknown relation forms {sorted(unknown)}: use {sorted(RELATION_FORMS)}")
        self._relation_kind = {r.series_name: RELATION_FORMS[r.form] for r in self._relations}
        # Each metric of a relation gets a column of the pairing table (`_score_relations`).
        paired = sorted({m for r in self._relations for m in (r.primary, r.reference)})
        self._paired_index = {m: i for i, m in enumerate(paired)}
        self._pair_columns = [(self._paired_index[r.primary], self._paired_index[r.reference]) for r in self._relations]
        self._reset(initial_series)

    def _kind(self, key: Any) -> float | None:
        """How a series is judged: a relation's form for a relation series, else `kind_of`'s answer
        (None: no opinion, the default stands)."""
        if isinstance(key, tuple) and len(key) == 2 and key[1] in self._relation_kind:
            return self._relation_kind[key[1]]
        return self._kind_of(key) if self._kind_of is not None else None

    def _reset(self, initial_series: int) -> None:
        self._ids: dict[Hashable, int] = {}
        self.state = _cache_aligned(np.zeros((initial_series, kernels.STATE_COLUMNS)))
        # float64, though 3/4 of a series' state: an hour's mean learns at `hour_alpha` per hour of
        # readings, so at a reading a second a step is 3e-5 of its distance from the mean, which
        # float32 rounds away at a level of 1,000 (docs/processing.md, "Checkpoint size").
        self.hourly = _cache_aligned(np.zeros((kernels.DAY_KINDS, initial_series, kernels.HOURS, 3)))
        self.low = np.full(initial_series, -np.inf)
        self.high = np.full(initial_series, np.inf)
        self.measured = np.full(initial_series, kernels.MEASURED)  # how each series is judged
        # Wall-clock ms of each series' newest arrival (score_readings, mark_arrivals), for dropouts
        # on a live feed; not part of snapshots. NaN: not seen since this object was made.
        self.arrivals = np.full(initial_series, np.nan)
        # What pairing needs of each series (`pairs`), noted the first time it is paired, so a batch
        # is paired without a loop over its readings; ids change only here (evict, restore), so these
        # start again with them. Its metric's column in the pairing table (-1: in no relation; -2:
        # not known yet), its device as a number, and the relation series it is the primary of.
        self._pair_role = np.full(initial_series, UNKNOWN_ROLE, np.int64)
        self._device_code = np.full(initial_series, -1, np.int64)
        self._device_codes: dict[str, int] = {}
        self._relation_series = np.full((initial_series, max(1, len(self._relations))), -1, np.int64)

    @property
    def n_series(self) -> int:
        return len(self._ids)

    def knows(self, key: Hashable) -> bool:
        return key in self._ids

    def keys(self) -> list[Any]:
        """Series keys in id order."""
        return list(self._ids)

    def series_ids(
        self, keys: Iterable[Hashable], ranges: Mapping[Any, tuple[float, float]] | None = None
    ) -> np.ndarray:
        """Dense ids for series keys, creating state for new ones: their kind from `kind_of`, their
        physical range from `ranges` where it has them, else from `range_of`."""
        ids = []
        for key in keys:
            sid = self._ids.get(key)
            if sid is None:
                sid = self._ids[key] = len(self._ids)
                self._grow(sid + 1)
                self.low[sid], self.high[sid] = ranges[key] if ranges and key in ranges else self._range_of(key)
                kind = self._kind(key)
                if kind is not None:
                    self.measured[sid] = kind
            ids.append(sid)
        return np.asarray(ids, dtype=np.int64)

    def score_readings(
        self, readings: Sequence[SeriesReading], now_ms: float, records: Sequence[int] | None = None
    ) -> BatchScores:
        """Score a batch of readings of (device_id, metric) series, arrived at wall-clock `now_ms`.

        Each series is scored in event-time order within the batch (a stable sort: in-order series
        keep their order), since several gateways can swap two messages of one device on the way to
        Kafka; the results come back in the order given. `records`: the record (message) each
        reading came in, where relations pair readings only within one (so how records fall into
        batches changes nothing); None: the batch is one record."""
        n = len(readings)
        ids = self.series_ids([(r.device_id, r.metric) for r in readings])  # grows the state as needed
        found = self.state[ids[:, None], FOUND_COLUMNS]
        ts = np.fromiter((r.ts_ms for r in readings), np.float64, n)
        values = np.fromiter((r.value for r in readings), np.float64, n)
        order = np.argsort(ts, kind="stable")
        scores, reasons = np.empty(n), np.empty(n, np.int64)
        scores[order], reasons[order] = self.score(ids[order], ts[order], values[order])
        if self._relations:
            self._score_relations(readings, records, ids, ts, values, scores, reasons)
        self.mark_arrivals(ids, now_ms)
        return BatchScores(ids, scores, reasons, found)

    def _score_relations(
        self,
        readings: Sequence[SeriesReading],
        records: Sequence[int] | None,
        ids: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        scores: np.ndarray,
        reasons: np.ndarray,
    ) -> None:
        """Judge the batch's pairs (`pairs`) in that order, and merge each pair's judgement into its
        primary reading's (`_merged`)."""
        primary, reference, relation = self.pairs(readings, records, ids, ts, values)
        if primary.size == 0:
            return
        relation_ids = self._relation_series[ids[primary], relation]
        new = np.flatnonzero(relation_ids < 0)
        if new.size:  # relation series not met since these ids were given: made, or found by key
            names = [r.series_name for r in self._relations]
            keys = [(readings[int(primary[k])].device_id, names[int(relation[k])]) for k in new.tolist()]
            relation_ids[new] = self.series_ids(keys, dict.fromkeys(keys, (-np.inf, np.inf)))
            self._relation_series[ids[primary[new]], relation[new]] = relation_ids[new]
        pair_scores = np.zeros(relation_ids.size)
        pair_reasons = np.zeros(relation_ids.size, np.int64)
        kernels.relation_batch(
            relation_ids,
            np.ascontiguousarray(ts[primary]),
            np.ascontiguousarray(values[primary]),
            np.ascontiguousarray(values[reference]),
            self.measured,
            self.state,
            kernels.Params(*self.params.tolist()),
            pair_scores,
            pair_reasons,
        )
        repeat_below = float(self.params[kernels.P_REPEAT_BELOW])
        for k in np.flatnonzero(pair_reasons != kernels.NONE).tolist():
            i = int(primary[k])
            scores[i], reasons[i] = _merged(
                float(scores[i]), int(reasons[i]), float(pair_scores[k]), int(pair_reasons[k]), repeat_below
            )

    def pairs(
        self,
        readings: Sequence[SeriesReading],
        records: Sequence[int] | None,
        ids: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's pairs, as indices of their primary and reference readings and of their
        relation (in `relations`), in the order they are judged: by time, then by where their
        (device, time, record) first appeared in the batch, then by relation. A pair is both metrics
        of a relation from one device at one time in one record, each value finite and inside its
        series' declared range; where a metric repeats there, its last reading stands for it.
        Paired in NumPy: a loop in Python over every reading cost a worker more than the kernel
        (docs/processing.md, "Relations between a device's metrics")."""
        nothing = np.zeros(0, np.int64)
        role = self._pair_role[ids]
        for i in np.flatnonzero(role == UNKNOWN_ROLE).tolist():  # a series' first batch
            sid, reading = int(ids[i]), readings[i]
            self._pair_role[sid] = self._paired_index.get(reading.metric, -1)
            if self._pair_role[sid] >= 0:
                self._device_code[sid] = self._device_codes.setdefault(reading.device_id, len(self._device_codes))
            role[i] = self._pair_role[sid]
        usable = np.isfinite(ts) & np.isfinite(values) & (values >= self.low[ids]) & (values <= self.high[ids])
        candidates = np.flatnonzero((role >= 0) & usable)
        if candidates.size < 2:
            return nothing, nothing, nothing
        device = self._device_code[ids[candidates]]
        record = np.zeros(candidates.size, np.int64) if records is None else np.asarray(records)[candidates]
        time = ts[candidates]
        metric = role[candidates]
        # Sorted by device, time, record, metric, then arrival: each (device, time, record) is a run
        # (a group), within it each metric's last reading ends its own run.
        order = np.lexsort((candidates, metric, record, time, device))
        device, time, record = device[order], time[order], record[order]
        metric, index = metric[order], candidates[order]
        starts = np.concatenate(
            ([True], (device[1:] != device[:-1]) | (time[1:] != time[:-1]) | (record[1:] != record[:-1]))
        )
        group = np.cumsum(starts) - 1
        first_seen = np.minimum.reduceat(index, np.flatnonzero(starts))  # where each group began
        last = np.concatenate(((group[1:] != group[:-1]) | (metric[1:] != metric[:-1]), [True]))
        table = np.full((int(group[-1]) + 1, len(self._paired_index)), -1, np.int64)  # group x metric -> reading
        table[group[last], metric[last]] = index[last]
        found = []
        for k, (p, q) in enumerate(self._pair_columns):
            both = (table[:, p] >= 0) & (table[:, q] >= 0)
            found.append((table[both, p], table[both, q], np.full(int(both.sum()), k), first_seen[both]))
        primary, reference, relation, began = (np.concatenate(column) for column in zip(*found, strict=True))
        order = np.lexsort((relation, began, ts[primary]))
        return primary[order], reference[order], relation[order]

    def _grow(self, needed: int) -> None:
        size = self.state.shape[0]
        if needed <= size:
            return
        new = max(needed, size * 2)
        self.state = _cache_aligned(np.concatenate([self.state, np.zeros((new - size, kernels.STATE_COLUMNS))]))
        self.hourly = _cache_aligned(
            np.concatenate([self.hourly, np.zeros((kernels.DAY_KINDS, new - size, kernels.HOURS, 3))], axis=1)
        )
        self.low = np.concatenate([self.low, np.full(new - size, -np.inf)])
        self.high = np.concatenate([self.high, np.full(new - size, np.inf)])
        self.measured = np.concatenate([self.measured, np.full(new - size, kernels.MEASURED)])
        self.arrivals = np.concatenate([self.arrivals, np.full(new - size, np.nan)])
        self._pair_role = np.concatenate([self._pair_role, np.full(new - size, UNKNOWN_ROLE, np.int64)])
        self._device_code = np.concatenate([self._device_code, np.full(new - size, -1, np.int64)])
        self._relation_series = np.concatenate(
            [self._relation_series, np.full((new - size, self._relation_series.shape[1]), -1, np.int64)]
        )

    def score(self, series: np.ndarray, ts_ms: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores in [0, 1] and reason codes for a batch in arrival order. NaN scores 0 and teaches nothing."""
        series = np.ascontiguousarray(series, dtype=np.int64)
        ts = np.ascontiguousarray(ts_ms, dtype=np.float64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        if not (series.ndim == ts.ndim == values.ndim == 1 and series.shape == ts.shape == values.shape):
            raise ValueError("series, ts_ms and values must be 1-d arrays of one length")
        nonfinite, ids_ok = kernels.inspect_batch(series, ts, values, self.n_series)
        if not ids_ok:
            raise ValueError("unknown series id: get ids from series_ids()")
        scores = np.zeros(series.shape[0])
        reasons = np.zeros(series.shape[0], dtype=np.int64)
        params = kernels.Params(*self.params.tolist())
        if nonfinite == 0:
            kernels.detect_batch(
                series, ts, values, self.low, self.high, self.measured, self.state, self.hourly, params, scores, reasons
            )
        elif nonfinite < series.shape[0]:
            idx = np.flatnonzero(np.isfinite(values) & np.isfinite(ts))
            sub_scores = np.zeros(idx.size)
            sub_reasons = np.zeros(idx.size, dtype=np.int64)
            kernels.detect_batch(
                series[idx],
                ts[idx],
                values[idx],
                self.low,
                self.high,
                self.measured,
                self.state,
                self.hourly,
                params,
                sub_scores,
                sub_reasons,
            )
            scores[idx], reasons[idx] = sub_scores, sub_reasons
        return scores, reasons

    def mark_arrivals(self, series: np.ndarray, now_ms: float) -> None:
        self.arrivals[series] = now_ms

    def silence(self, now_ms: float, factor: float = 5.0, *, since_arrival: bool = False) -> np.ndarray:
        """Dropout scores per series id, for a timer: silent for more than `factor` usual intervals,
        counted from each series' newest event time, or from its newest arrival (`since_arrival`),
        which is what a live feed wants when replayed or late data carries old event times."""
        n = self.n_series
        last_seen = self.arrivals[:n] if since_arrival else self.state[:n, kernels.LAST_TS]
        out = np.zeros(n)
        kernels.silence_scores(
            float(now_ms), self.state[:n], np.ascontiguousarray(last_seen), self.params[kernels.P_WARMUP], factor, out
        )
        out[np.isin(self.measured[:n], RELATION_KINDS)] = 0.0  # a relation's metrics tell their own silences
        return out

    def evict(self, before_ms: float) -> np.ndarray:
        """Forget every series whose newest reading (event time, its state's LAST_TS) is older than
        `before_ms`: its rows go, the others keep their order and are renumbered densely, so a
        snapshot holds only the kept series. A series evicted that reports again starts fresh, as a
        new one. Returns each old id's new id (-1: evicted), for whoever holds ids (the processor's
        dropout set). A series that never scored a reading in range (LAST_TS 0) has learnt nothing
        and goes too."""
        n = self.n_series
        keep = ~(self.state[:n, kernels.LAST_TS] < before_ms)
        new_id = np.full(n, -1, dtype=np.int64)
        kept = np.flatnonzero(keep)
        new_id[kept] = np.arange(kept.size)
        if kept.size == n:
            return new_id
        keys = self.keys()
        m = kept.size
        state, hourly = self.state[kept], self.hourly[:, kept]
        low, high, measured, arrivals = self.low[kept], self.high[kept], self.measured[kept], self.arrivals[kept]
        # Give memory back once most rows are gone; else compact in place.
        capacity = self.state.shape[0]
        self._reset(max(1024, 2 * m) if capacity > 4 * max(m, 256) else capacity)
        self._ids = {keys[i]: j for j, i in enumerate(kept.tolist())}
        self.state[:m], self.hourly[:, :m] = state, hourly
        self.low[:m], self.high[:m], self.measured[:m], self.arrivals[:m] = low, high, measured, arrivals
        return new_id

    def evict_silent(self, now_ms: float, after_ms: float) -> np.ndarray:
        """Evict the series silent for more than `after_ms` of event time, counted back from the
        newest event time these detectors have scored, or from `now_ms` (the wall clock) if that is
        earlier: a device whose clock runs years ahead must not make every other series look silent.
        Event time, so a replay or a re-read after a restart evicts as a live stream does."""
        n = self.n_series
        newest = float(self.state[:n, kernels.LAST_TS].max()) if n else -np.inf
        return self.evict(min(newest, now_ms) - after_ms)

    def snapshot(self) -> DetectorSnapshot:
        n = self.n_series
        return DetectorSnapshot(
            dict(self._ids),
            self.state[:n].copy(),
            self.hourly[:, :n].copy(),
            self.low[:n].copy(),
            self.high[:n].copy(),
            self.params.copy(),
            self.measured[:n].copy(),
        )

    def restore(self, snapshot: DetectorSnapshot) -> None:
        """Take up a snapshot's series, state and parameters; each series' kind from `kind_of` if
        given (a checkpoint may predate a kind), else the snapshot's."""
        self.params = np.ascontiguousarray(snapshot.params, dtype=np.float64)
        self._reset(max(1024, len(snapshot.ids)))
        self._ids = dict(snapshot.ids)
        n = len(snapshot.ids)
        self.state[:n] = snapshot.state
        self.hourly[:, :n] = snapshot.hourly
        self.low[:n] = snapshot.low
        self.high[:n] = snapshot.high
        self.measured[:n] = snapshot.measured
        for key, sid in self._ids.items():
            kind = self._kind(key)
            # A relation series stays one (and never silent) where these detectors were given no
            # relations: eviction forgets it in time. One whose form changed learns again.
            if kind is not None and (kind in RELATION_KINDS or self.measured[sid] not in RELATION_KINDS):
                if kind in RELATION_KINDS and kind != self.measured[sid]:
                    self.state[sid, kernels.COUNT] = 0.0
                self.measured[sid] = kind


@dataclass(frozen=True)
class DetectorSnapshot:
    """Everything a restart needs to score exactly as before: series ids, state arrays, parameters."""

    ids: dict[Hashable, int]
    state: np.ndarray
    hourly: np.ndarray
    low: np.ndarray
    high: np.ndarray
    params: np.ndarray
    measured: np.ndarray


def serialize(snapshot: DetectorSnapshot) -> tuple[list[list[str]], bytes]:
    """Series keys in id order and the arrays as one .npz blob, deflated (zlib, CHECKPOINT_ZLIB_LEVEL):
    what `detector_checkpoints` stores."""
    keys = sorted(snapshot.ids, key=snapshot.ids.__getitem__)
    blob = zlib.compress(snapshot_npz(snapshot), CHECKPOINT_ZLIB_LEVEL)
    return [list(k) if isinstance(k, tuple) else [k] for k in keys], blob  # type: ignore[list-item]


def snapshot_npz(snapshot: DetectorSnapshot) -> memoryview:
    """A snapshot's arrays as one .npz, not deflated: what checkpoints held before they were."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        state=snapshot.state,
        hourly=snapshot.hourly,
        low=snapshot.low,
        high=snapshot.high,
        params=snapshot.params,
        measured=snapshot.measured,
    )
    return buffer.getbuffer()


def deserialize(series: list[list[str]], blob: bytes) -> DetectorSnapshot:
    if not blob.startswith(ZIP_MAGIC):  # deflated; checkpoints written before that are the .npz itself
        blob = zlib.decompress(blob)
    with np.load(io.BytesIO(blob)) as arrays:
        ids: dict[Hashable, int] = {tuple(key): i for i, key in enumerate(series)}
        # Checkpoints written before state codes existed have no "measured": every series was measured.
        measured = arrays["measured"] if "measured" in arrays.files else np.ones(len(ids))
        # Parameters and state columns are only ever appended, so a checkpoint from an older version
        # lacks the newest (their defaults, and 0), and one from a newer version (a rollback) has
        # some this version does not know, which it sets aside rather than crash on every restart.
        params = arrays["params"][: kernels.DEFAULT_PARAMS.shape[0]]
        if params.shape[0] < kernels.DEFAULT_PARAMS.shape[0]:  # written before newer parameters: their defaults
            params = np.concatenate([params, kernels.DEFAULT_PARAMS[params.shape[0] :]])
        state = arrays["state"][:, : kernels.STATE_COLUMNS]
        if state.shape[1] < kernels.STATE_COLUMNS:  # written before newer state columns: they start at 0
            state = np.concatenate([state, np.zeros((state.shape[0], kernels.STATE_COLUMNS - state.shape[1]))], axis=1)
        hourly = arrays["hourly"]
        if hourly.ndim == 3:  # (series, hours, 3): written before weekend profiles, which start empty
            hourly = np.stack([hourly, np.zeros_like(hourly)])
        return DetectorSnapshot(ids, state, hourly, arrays["low"], arrays["high"], params, measured)
