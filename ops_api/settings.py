"""Ops API settings (`KOTA_API_*`): what operators see as online, limits, caches, live feed bounds."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kota.contract import PROCESSOR_GROUP
from processing.rules import RulePolicy


class ApiSettings(BaseSettings):
    """The ops API's settings (`KOTA_API_*`): workers, caches, the live feed and token lifetimes."""

    model_config = SettingsConfigDict(env_prefix="KOTA_API_", extra="ignore")

    # Device status from the newest stored reading: online, then stale, then offline.
    stale_after_s: float = 300.0
    offline_after_s: float = 1800.0
    # Local time of the cities served: "usual for this hour and weekday" is reckoned in it.
    timezone: str = "Asia/Jakarta"
    # Noise: default limit for a sensor without its own row in noise_limits (KepMenLH 48/1996, residential).
    noise_limit_dba: float = 55.0
    # Traffic: free-flow speed when a corridor has no history yet.
    free_flow_kmh: float = 60.0
    baseline_weeks: int = 4
    # Water (minimum night flow, at any hour): a meter whose lowest flow over the window stays this
    # far above the lowest it usually reaches in those hours (median of the earlier days) is a
    # suspected leak: water running that usually stops. The rule and its margin are the processor's
    # (processing.rules.suspected_leak), which alerts on it over 01:00-04:00 each night.
    leak_window_h: float = 3.0
    leak_min_flow_m3h: float = RulePolicy().leak_min_flow_m3h
    leak_history_days: int = RulePolicy().leak_history_nights
    # Street lights: "on" drawing less than this is a failed lamp.
    lamp_fault_w: float = 10.0
    # Server processes sharing the port: Python serves one request at a time per process, so this
    # machine's two cores need two (bench/api.py). Each runs its own live-feed reader.
    workers: int = 2
    # Verified tokens are trusted this long before the database is asked again. Not a revocation
    # delay: a change of access is announced by the database (NOTIFY) and forgets them at once.
    token_cache_s: float = 10.0
    # /health asks PostgreSQL, Kafka and the broker at most this often per process; callers
    # meanwhile get the last answer (a probe every second from every load balancer costs nothing).
    health_cache_s: float = 2.0
    # The city-wide device snapshot is shared by concurrent callers for this long.
    snapshot_cache_s: float = 1.0
    # Settled parts of series pages kept per worker process (ops_api/series_cache.py): a day of
    # 1-minute points is about 150 KB.
    series_cache_mib: float = 64.0
    # A series page checked against the database this recently is answered as it was then (0: never).
    series_fresh_s: float = 1.0
    # Up to this old it is still answered as kept while it is checked again behind the answer (under
    # load); older, the request waits for the check (ops_api/series_cache.py).
    series_stale_s: float = 5.0
    # Live feed: events a client may have waiting before it is dropped as too slow (a few seconds of
    # a busy city; the frames waiting are shared by the clients of one filter, so this costs little).
    live_queue_events: int = 5000
    live_kafka_enabled: bool = True  # and the rejections' reader (ops_api/rejections.py)
    # A device's rejections (GET /devices/{id}/rejections): read from the dead-letter topic this far
    # back when the API starts; the newest this many of each device or gateway, for this many of them.
    rejections_window_s: float = 86_400.0
    rejections_per_sender: int = 10
    rejections_senders: int = 1000  # at worst about 50 MB a process (5 KB a dead letter kept)
    # /health reports Kafka lag against the offsets this consumer group stored: the processor's own
    # setting, read here without importing the processor (which loads numba).
    processor_group_id: str = Field(default=PROCESSOR_GROUP, validation_alias="KOTA_PROCESSOR_GROUP_ID")
    # Commands to devices (kota/commands.py): how long one waits for a result unless the request says,
    # and how many one device may be sent a minute (more: 429 rate_limited).
    command_ttl_s: float = 3600.0
    commands_per_device_per_minute: int = 10
