"""Per-sender rate limits at the gateway: one flooding device must not hold up the others.

Mosquitto 2.0 has no per-client publish rate limit, so the gateway keeps one token bucket per MQTT
account (the sender named in the topic, which the broker's ACL ties to the account). A message
over the limit is not parsed and not forwarded: it costs a dictionary lookup, is counted, and the
sender's rejected messages of one batch become one dead letter (reason `rate_limited`).

The bucket refills in the gateway's receive time. After a gateway outage the broker delivers each
sender's backlog at once, so the burst is sized to hold a long outage of an honest device (20
minutes at the top rate); testing accounts that publish history as fast as the broker takes it
(`kota simulate --start`, `kota replay`, benchmarks) are registered without a limit (rate 0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's shape: the sustained rate and the burst."""

    per_s: float  # sustained messages per second; 0 means no limit
    burst: float  # messages a sender may send at once after being quiet

    @classmethod
    def of(cls, per_s: float, burst_s: float) -> RateLimit:
        """A limit of `per_s` whose burst is `burst_s` seconds of sending at that rate."""
        return cls(per_s, max(1.0, per_s * burst_s))


class SenderBuckets:
    """Token buckets by sender; `allow(sender, limit, now)` spends one token if there is one."""

    def __init__(self, max_senders: int = 200_000) -> None:
        self._buckets: dict[str, list[float]] = {}  # sender → [tokens, last refill time]
        self._max_senders = max_senders

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: str, limit: RateLimit, now_s: float) -> bool:
        if limit.per_s <= 0:
            return True
        bucket = self._buckets.get(sender)
        if bucket is None:
            if len(self._buckets) >= self._max_senders:
                self._forget_full(now_s)
            bucket = self._buckets[sender] = [limit.burst, now_s]
        tokens = min(limit.burst, bucket[0] + (now_s - bucket[1]) * limit.per_s)
        bucket[1] = now_s
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_full(self, now_s: float) -> None:
        """Bounded memory: drop senders quiet long enough that a new bucket would be as full. The ACL
        lets only registered accounts publish, so this is a backstop, not the usual path."""
        idle = [s for s, (_, last) in self._buckets.items() if now_s - last > 3600]
        for sender in idle or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[sender]
