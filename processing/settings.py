"""Processor settings (`KOTA_PROCESSOR_*`): batches, workers, detector thresholds, maintenance."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from kota.contract import PROCESSOR_GROUP
from processing import kernels


class ProcessorSettings(BaseSettings):
    """The stream processor's settings (`KOTA_PROCESSOR_*`): batching, workers, detectors and alerts."""

    model_config = SettingsConfigDict(env_prefix="KOTA_PROCESSOR_", extra="ignore")

    group_id: str = PROCESSOR_GROUP
    # Processes sharing the readings partitions (processing/workers.py): one processor and its
    # database backend take turns, so with one, one of two cores sits idle (docs/processing.md).
    workers: int = 2
    max_batch_records: int = 5_000
    # A batch is also bounded by readings (a record holds one message: one reading or hundreds), so
    # no transaction grows to seconds; the bound matters only near saturation, where larger batches
    # cost less a reading (figures in docs/processing.md, "How we got here").
    max_batch_readings: int = 24_000
    poll_timeout_ms: int = 200
    retry_wait_s: float = 1.0
    # Tries of a batch the database refuses (a DataError, an IntegrityError...: not one it cannot be
    # reached for, which is retried until it can) before it is stored in halves, in savepoints, down to
    # the records that fail alone, which become dead letters (processing.store.write_isolating).
    storage_tries: int = 3
    metrics_enabled: bool = True
    # A score at or above this stores an anomaly and signals an alert: chosen for operators, not swept.
    # bench/nab's sweep picks 0.28 for these detectors (NAB's standard profile rewards early detection
    # over quiet); at 0.3 they score 68.3 there, as deployed.
    anomaly_threshold: float = 0.3
    allowed_lateness_s: float = 2 * 86_400.0
    checkpoint_interval_s: float = 30.0
    dropout_check_s: float = 10.0
    dropout_factor: float = 5.0  # silent for this many usual intervals
    # Spikes a series shows routinely score less (processing/kernels.py, P_ROUTINE_RATE; 0 turns it
    # off). A sensor that starts flapping raises one alert from its first spikes; the damped ones
    # after them are repeats (kernels.REPEAT), which keep that alert from clearing while it flaps.
    routine_spike_rate: float = 0.003
    # Scores reported as Numenta's anomaly likelihood of the detectors' raw scores (processing/kernels.py,
    # LIKELIHOOD_PARAMS; docs/processing.md, "Anomaly likelihood"), as bench/nab's headline row: the
    # one whose score holds on files its threshold was not chosen on (cross-validated within 2.3 points
    # of in-sample, where raw scores lose 10-13). Off: raw scores with routine-spike damping.
    anomaly_likelihood: bool = True
    # Saturdays and Sundays get an hour-of-day profile of their own (processing/kernels.py, P_WEEKENDS),
    # by local time at this offset from UTC (7: Western Indonesian Time): a city's traffic, noise and
    # power follow the week, and a series judged against its usual hour would otherwise call every
    # Saturday's missing rush hour a dip.
    weekend_profiles: bool = True
    # Pairs of a device's metrics that keep a physical relation (kota.contract.RELATIONS: PM2.5 a
    # share of PM10, LAeq below LAmax) are judged together: a sensor drifting away from its partner
    # is an `inconsistent` anomaly on the primary metric (processing/kernels.py, relation_batch).
    relations: bool = True
    utc_offset_hours: float = 7.0
    # An hour of the day whose usual spread is under 1/daily_tightness of the series' overall spread
    # judges spikes and dips against its own usual level (processing/kernels.py, P_DAILY_TIGHTNESS;
    # 0: the hour's profile only excuses a value).
    daily_tightness: float = float(kernels.DEFAULT_PARAMS[kernels.P_DAILY_TIGHTNESS])
    # Series silent for this many days of event time are evicted from the detectors' state and so
    # from its checkpoints (0: never); one that reports again starts fresh. Event time, so a replay
    # or a re-read after a restart evicts as the live stream did (docs/processing.md, "Eviction").
    evict_after_days: float = 30.0
    # How often (processing time) a partition's detectors look for series to evict: a check is a pass
    # over every series' last time, too much for every batch and never urgent.
    evict_check_s: float = 300.0
    clear_after_s: float = 600.0  # an alert clears after its metric is normal this long (event time)
    maintenance_interval_s: float = 60.0  # rollups and retention (plain PostgreSQL)
    ispu_window_minutes: int = 60
