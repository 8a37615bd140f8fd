"""Processor settings (`KOTA_PROCESSOR_*`): batches, workers, detector thresholds, maintenance."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from kota.contract import PROCESSOR_GROUP
from processing import kernels


class ProcessorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOTA_PROCESSOR_", extra="ignore")

    group_id: str = PROCESSOR_GROUP
    # Processes sharing the readings partitions (processing/workers.py): one processor and its
    # database backend take turns, so one of this machine's two cores sat idle with one.
    # bench.processing, the same run: 62k readings/s with one, 99-101k with two.
    workers: int = 2
    max_batch_records: int = 5_000
    # A batch is also bounded by readings: a record holds one device message, from one reading to
    # hundreds (a replay, a gateway's backlog). Bounded by records alone, the million-reading test's
    # batches held 390,000 readings (785 records of 500: what a 4 MB partition fetch gives), each a
    # transaction of many seconds that a kill -9 threw away whole. The record count asked of Kafka
    # follows the readings per record of recent batches. A batch below the bound holds what came
    # while the last one was written, so the bound matters only near saturation, where a larger
    # batch holds more readings of each series and its one-minute and latest-value upserts (one a
    # series a batch) cost less a reading. bench.e2e on a bench database of 13 GB, both orders:
    # 50,000/s sustained with 24,000 (p99 to the database 1.46 and 1.87 s), not with 8,000 (41-51k
    # stored, p99 2.8-4.6 s); at 60,000/s offered, 51-56k stored against 48k. (8,000 was chosen
    # when one slower worker ran at 15,000/s, where a larger bound made a live stream wait longer.)
    max_batch_readings: int = 24_000
    poll_timeout_ms: int = 200
    retry_wait_s: float = 1.0
    # Tries of a batch the database refuses (a DataError, an IntegrityError...: not one it cannot be
    # reached for, which is retried until it can) before it is stored in halves, in savepoints, down to
    # the records that fail alone, which become dead letters (processing.store.write_isolating).
    storage_tries: int = 3
    metrics_enabled: bool = True
    # A score at or above this stores an anomaly and signals an alert. bench/nab's sweep picks a lower
    # one (0.1) because NAB's standard profile rewards early detection over quiet; operators want fewer.
    anomaly_threshold: float = 0.3
    allowed_lateness_s: float = 2 * 86_400.0
    checkpoint_interval_s: float = 30.0
    dropout_check_s: float = 10.0
    dropout_factor: float = 5.0  # silent for this many usual intervals
    # Spikes a series shows routinely score less (processing/kernels.py, P_ROUTINE_RATE; 0 turns it
    # off). A sensor that starts flapping raises one alert from its first spikes; the damped ones
    # after them are repeats (kernels.REPEAT), which keep that alert from clearing while it flaps.
    routine_spike_rate: float = 0.003
    # Saturdays and Sundays get an hour-of-day profile of their own (processing/kernels.py, P_WEEKENDS),
    # by local time at this offset from UTC (7: Western Indonesian Time): a city's traffic, noise and
    # power follow the week, and a series judged against its usual hour would otherwise call every
    # Saturday's missing rush hour a dip.
    weekend_profiles: bool = True
    utc_offset_hours: float = 7.0
    # An hour of the day whose usual spread is under 1/daily_tightness of the series' overall spread
    # judges spikes and dips against its own usual level (processing/kernels.py, P_DAILY_TIGHTNESS;
    # 0: the hour's profile only excuses a value).
    daily_tightness: float = float(kernels.DEFAULT_PARAMS[kernels.P_DAILY_TIGHTNESS])
    clear_after_s: float = 600.0  # an alert clears after its metric is normal this long (event time)
    maintenance_interval_s: float = 60.0  # rollups and retention (plain PostgreSQL)
    ispu_window_minutes: int = 60
