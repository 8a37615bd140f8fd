"""Per-sender rate limits at the gateway: one flooding device must not hold up the others.

Mosquitto 2.0 has no per-client publish rate limit, so the gateway keeps one token bucket per MQTT
account (the sender named in the topic, which the broker's ACL ties to the account). A message
over the limit is not parsed and not forwarded: it costs a dictionary lookup, is counted, and the
sender's rejected messages of one batch become one dead letter (reason `rate_limited`).

A message may hold up to 10,000 readings, so a message rate alone lets one device write 200,000
readings a second to Kafka. Each account therefore has a second bucket, in readings: its message
rate times `readings_per_message` (10 by default), with the same burst in seconds but never less
than one message's worth of values, so a full bucket always takes one full message. A message that
does not fit is refused whole (`rate_limited`) and costs nothing from the bucket; one that fits
spends as many tokens as it has readings, before duplicates are dropped.

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

    def in_readings(self, readings_per_message: float, least_burst: float) -> RateLimit:
        """The readings budget that goes with this message limit (no limit stays no limit)."""
        if self.per_s <= 0 or readings_per_message <= 0:
            return RateLimit(0.0, 0.0)
        return RateLimit(self.per_s * readings_per_message, max(least_burst, self.burst * readings_per_message))


class SenderBuckets:
    """Token buckets by sender; `allow(sender, limit, now, cost)` spends `cost` tokens if there are as
    many, and spends nothing otherwise."""

    def __init__(self, max_senders: int = 200_000) -> None:
        self._buckets: dict[str, list[float]] = {}  # sender → [tokens, last refill time]
        self._max_senders = max_senders

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: str, limit: RateLimit, now_s: float, cost: float = 1.0) -> bool:
        if limit.per_s <= 0:
            return True
        bucket = self._buckets.get(sender)
        if bucket is None:
            if len(self._buckets) >= self._max_senders:
                self._forget_full(now_s)
            bucket = self._buckets[sender] = [limit.burst, now_s]
        tokens = min(limit.burst, bucket[0] + (now_s - bucket[1]) * limit.per_s)
        bucket[1] = now_s
        if tokens < cost:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - cost
        return True

    def _forget_full(self, now_s: float) -> None:
        """Bounded memory: drop senders quiet long enough that a new bucket would be as full. The ACL
        lets only registered accounts publish, so this is a backstop, not the usual path."""
        idle = [s for s, (_, last) in self._buckets.items() if now_s - last > 3600]
        for sender in idle or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[sender]
