"""Series pages for repeated callers, without the database writing again what has not changed.

A day of 1-minute points is 1,440 points of JSON; writing them costs the database about four times
what reading them does, and a command centre asks for the same charts over and over. So a page is
kept split at a cut a few windows behind its end: the JSON of the settled points before the cut,
and their fingerprint. A later request for the same page still reads every point (one index range
scan), but has the database write only the few points from the cut on and the fingerprint of those
before it; the kept JSON stands in for them only when the fingerprint is unchanged.

The fingerprint (points, readings, first and last time, sum of values) follows every way a settled
point can change: a late reading merged into a window adds to its count of readings, one into an
empty minute adds a point, retention takes the first points away, and anything else that rewrites
a value changes the sum. So an answer checked this way is the answer the database would give now.

Within `fresh_s` of such a check (1 s by default, as the city map's snapshot), the same caller
scope asking for the same page gets the checked answer again, as it was then (its `end` says when),
without a connection or a round trip: a chart at most a second behind, as the map is, and a command
centre of operators on the same charts costs the database about two checks a second per page, made
in the background once half of `fresh_s` has passed. Zero turns that off.

Under more load than the background checks keep up with, a page up to `stale_s` old (5 s) is still
answered as kept while its check runs behind it (stale-while-revalidate, as RFC 5861 has it for
HTTP caches), and callers of a page already being checked wait for that check rather than asking
again. Before, each caller of a page past `fresh_s` asked the database itself, and a request that
asks waits several turns of a busy event loop: bench/api.py's 200 day pages at 50 clients had p90
100 ms and p99 144 ms against a p50 of 7 ms.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace

from prometheus_client import Counter
from psycopg import AsyncConnection

from ops_api.series import Resolution, SplitPage, query_series_split

# How far behind the page's end the cut goes: past the windows readings are still arriving for.
SETTLING: dict[str, dt.timedelta] = {
    "raw": dt.timedelta(minutes=2),
    "1m": dt.timedelta(minutes=3),
    "1h": dt.timedelta(hours=2),
    "1d": dt.timedelta(days=2),
}
# A kept page is cut again once this many settling spans have passed since its cut, so the part
# written on every request stays short.
RECUT_AFTER = 4

PAGES = Counter(
    "kota_api_series_pages",
    "Series pages answered, by what the answer took: fresh (kept, checked "
    "within fresh_s), unchanged (checked, settled part kept), changed (checked, written again), new",
    ["answer"],
)
log = logging.getLogger(__name__)
Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
Scope = tuple[str, ...] | None
# Background checks at once, per process, on connections of their own (`background`), so that
# requests which must ask the database never queue behind them. Two on the request pool kept 200
# pages asked for at 50 clients no better than 2-5 s behind, and the pages past stale_s (1%)
# waited for their check: bench/api.py p99 90 ms, 24 ms with nothing waiting.
BACKGROUND_CHECKS = 4
PageKey = tuple[Scope, str, str, str, int, dt.datetime | None, dt.datetime | None]
# What a response body holds before and after its array's points, from the number of points and
# the last one's time.
Render = Callable[[int, dt.datetime | None], tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _Ask:
    """What a caller asked for a page: what a check of it asks the database, then or later."""

    connect: Connect
    cities: list[str] | None
    device_id: str
    metric: str
    resolution: Resolution
    start: dt.datetime
    end: dt.datetime
    limit: int
    render: Render


@dataclass(frozen=True, slots=True)
class _Kept:
    cut: dt.datetime
    head_print: tuple[object, ...]
    body: bytes  # the last answer
    head_at: tuple[int, int]  # where the settled points' JSON lies in it (kept once, not twice)
    checked_at: float  # when it was checked against the database (time.monotonic)

    @property
    def head_json(self) -> memoryview:
        return memoryview(self.body)[self.head_at[0] : self.head_at[1]]


class SeriesCache:
    """Kept pages, least recently used first out, within `max_bytes` of JSON and `max_pages` pages (a
    page's key and bookkeeping cost memory too, and callers choose keys: metric names, page bounds)."""

    def __init__(
        self, max_bytes: int, fresh_s: float = 0.0, stale_s: float | None = None, max_pages: int = 20_000
    ) -> None:
        self.max_bytes = max_bytes
        self.max_pages = max_pages
        self.fresh_s = fresh_s
        self.stale_s = fresh_s if stale_s is None else max(stale_s, fresh_s)
        self._kept: OrderedDict[PageKey, _Kept] = OrderedDict()
        self._bytes = 0
        self._checking: dict[PageKey, asyncio.Task[bytes | None]] = {}
        # Connections for checks made ahead of callers (a pool of BACKGROUND_CHECKS); None: the caller's.
        self.background: Connect | None = None
        # Pages past half their fresh time, waiting for a check ahead of their callers, with what their
        # last caller asked; the one checked longest ago goes first, BACKGROUND_CHECKS at a time.
        self._due: dict[PageKey, _Ask] = {}
        self._ahead = 0  # checks ahead of callers running now
        self.answers = dict.fromkeys(("fresh", "unchanged", "changed", "new"), 0)  # this cache's share of PAGES

    def __len__(self) -> int:
        return len(self._kept)

    async def page(
        self,
        connect: Connect,
        cities: list[str] | None,
        device_id: str,
        metric: str,
        resolution: Resolution,
        start: dt.datetime,
        end: dt.datetime,
        *,
        limit: int,
        start_given: bool,
        end_given: bool,
        render: Render,
    ) -> bytes | None:
        """The page (as query_series_split reads it) rendered, or None when the device is not in
        `cities` (None: any city). A connection is taken from `connect` only when the database is asked."""
        # A page asked for as "the day up to now" is the same page a second later: key it by what was asked.
        key: PageKey = (
            tuple(cities) if cities is not None else None,
            device_id,
            metric,
            resolution,
            limit,
            start if start_given else None,
            end if end_given else None,
        )
        ask = _Ask(connect, cities, device_id, metric, resolution, start, end, limit, render)
        settling = SETTLING[resolution]
        kept = self._kept.get(key)
        if kept is None or not (start < kept.cut <= end and end - kept.cut <= RECUT_AFTER * settling):
            kept = None
        elif (age := time.monotonic() - kept.checked_at) < self.stale_s:
            self._count("fresh")
            self._kept.move_to_end(key)
            if age >= self.fresh_s / 2 and key not in self._checking:
                # Check ahead in the background, so that a page asked for all the time is checked
                # before it goes stale and no caller waits on the database for it. (Waiting costs
                # more than the query: under load a request that goes to the database waits several
                # turns of the event loop; bench/api.py, p90 111 ms against p50 9 ms.) A few at once,
                # oldest first: every page past fresh_s checked at once queued dozens of checks on
                # the pool, ahead of the requests that must wait for one (p99 378 ms); whichever page
                # was asked for when a check ended left others past stale_s (p99 73 ms).
                self._due[key] = replace(ask, connect=self.background or connect)
                self._check_due()
            return kept.body
        # New, or too old to answer as kept: wait for its check (one a page, whoever asked first).
        checking = self._checking.get(key) or self._check(key, kept, ask)
        return await asyncio.shield(checking)

    def _check(self, key: PageKey, kept: _Kept | None, ask: _Ask) -> asyncio.Task[bytes | None]:
        """Ask the database about the page in a task of its own, which every caller of the page meanwhile
        awaits (shielded: a caller that goes away does not cancel it for the others)."""
        task = asyncio.create_task(self._answer(key, kept, ask))
        self._checking[key] = task
        task.add_done_callback(lambda done, key=key: self._checked(key, done))  # type: ignore[misc]
        return task

    def _check_due(self) -> None:
        """Start checks of due pages, the one checked longest ago first, up to BACKGROUND_CHECKS at once."""
        while self._ahead < BACKGROUND_CHECKS and self._due:
            key = min(self._due, key=lambda k: self._kept[k].checked_at if k in self._kept else 0.0)
            ask = self._due.pop(key)
            kept = self._kept.get(key)
            if key in self._checking or kept is None or time.monotonic() - kept.checked_at < self.fresh_s / 2:
                continue  # being checked for a caller, or gone, or checked since
            task = self._check(key, kept, ask)
            self._ahead += 1
            task.add_done_callback(self._checked_ahead)

    def _checked_ahead(self, _task: asyncio.Task[bytes | None]) -> None:
        self._ahead -= 1
        self._check_due()

    async def settled(self) -> None:
        """Wait for the checks running in the background, and those due (tests)."""
        while self._checking or self._due:
            if self._checking:
                await asyncio.wait(list(self._checking.values()))
            else:
                self._check_due()
                if not self._checking:
                    break

    def _checked(self, key: PageKey, task: asyncio.Task[bytes | None]) -> None:
        self._checking.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            # Its callers got the error; the next request for the page asks again.
            log.warning("checking a series page failed: %s", task.exception())

    async def _answer(self, key: PageKey, kept: _Kept | None, ask: _Ask) -> bytes | None:
        """Ask the database: the kept page's head checked and its tail written, or the page anew."""
        asked_at = time.monotonic()  # the answer is as of now at the earliest
        page_of = (ask.device_id, ask.metric, ask.resolution, ask.start, ask.end)
        if kept is not None:
            async with ask.connect() as conn:
                page = await query_series_split(
                    conn, *page_of, limit=ask.limit, cut=kept.cut, head_json=False, cities=ask.cities
                )
            if not page.visible:
                self._keep(key, None)
                return None
            if page.head_print == kept.head_print:
                self._count("unchanged")
                return self._keep_answer(key, kept.cut, kept.head_print, kept.head_json, page, ask.render, asked_at)
            self._count("changed")
        else:
            self._count("new")
        cut = max(ask.start, ask.end - SETTLING[ask.resolution])
        async with ask.connect() as conn:
            page = await query_series_split(conn, *page_of, limit=ask.limit, cut=cut, head_json=True, cities=ask.cities)
        if not page.visible:
            self._keep(key, None)
            return None
        assert page.head_json is not None
        return self._keep_answer(key, cut, page.head_print, page.head_json, page, ask.render, asked_at)

    def _count(self, answer: str) -> None:
        self.answers[answer] += 1
        PAGES.labels(answer).inc()

    def _keep_answer(
        self,
        key: PageKey,
        cut: dt.datetime,
        head_print: tuple[object, ...],
        head: bytes | memoryview,
        page: SplitPage,
        render: Render,
        asked_at: float,
    ) -> bytes:
        """The body of `head` (the settled points' JSON) and `page`'s tail, kept as `key`'s answer."""
        before, after = render(page.count, page.last)
        body = b"".join((before, head, b"," if head and page.tail_json else b"", page.tail_json, after))
        self._keep(key, _Kept(cut, head_print, body, (len(before), len(before) + len(head)), asked_at))
        return body

    def _keep(self, key: PageKey, kept: _Kept | None) -> None:
        """Keep `kept` as the newest entry (None: forget the key)."""
        old = self._kept.pop(key, None)
        if old is not None:
            self._bytes -= _size(old)
        if kept is None or kept.head_at[0] == kept.head_at[1] or _size(kept) > self.max_bytes:
            return  # nothing settled yet, or too big to keep
        self._kept[key] = kept
        self._bytes += _size(kept)
        while self._bytes > self.max_bytes or len(self._kept) > self.max_pages:
            dropped_key, dropped = self._kept.popitem(last=False)
            self._bytes -= _size(dropped)
            self._due.pop(dropped_key, None)


def _size(kept: _Kept) -> int:
    return len(kept.body)
