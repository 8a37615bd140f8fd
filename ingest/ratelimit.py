"""Per-sender rate limits at the gateway: one flooding device must not hold up the others.

Mosquitto 2.0 has no per-client publish rate limit, so the gateway keeps one token bucket per MQTT
account (the sender named in the topic, which the broker's ACL ties to the account). A message
over the limit is not parsed and not forwarded: it costs a dictionary lookup, is counted, and the
sender's rejected messages of one batch become one dead letter (reason `rate_limited`).

A message may hold 256 KiB and 10,000 readings, so a message rate alone lets one device make the
gateway parse 5 MiB and write 200,000 readings to Kafka a second. Each account therefore also has
a bucket in bytes (checked before parsing) and one in readings (after): its message rate times
`bytes_per_message` (16 KiB) and `readings_per_message` (10), each with a burst of `volume_burst_s`
(an hour, so a device's day-long store-and-forward backlog passes whole) but never less than one
largest message, so a full bucket always takes one. A message that does not fit is refused whole
(`rate_limited`) and spends nothing from that bucket; readings are counted before duplicates are
dropped, so a refused message sent again later is not called a duplicate.

The bucket refills in the gateway's receive time. After a gateway outage the broker delivers each
sender's backlog at once, so the burst is sized to hold a long outage of an honest device (20
minutes at the top rate); testing accounts that publish history as fast as the broker takes it
(`kota simulate --start`, `kota replay`, benchmarks) are registered without a limit (rate 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def is_rate(value: float) -> bool:
    """A finite number, 0 or more. NaN passes every comparison a bucket makes, and infinity never
    runs out: either would turn a limit off unseen."""
    return math.isfinite(value) and value >= 0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's shape: the sustained rate and the burst."""

    per_s: float  # sustained messages per second; 0 means no limit
    burst: float  # messages a sender may send at once after being quiet

    @classmethod
    def of(cls, per_s: float, burst_s: float) -> RateLimit:
        """A limit of `per_s` whose burst is `burst_s` seconds of sending at that rate."""
        if not (is_rate(per_s) and is_rate(burst_s)):
            raise ValueError(f"a rate and its burst are finite numbers, 0 or more (not {per_s!r}, {burst_s!r})")
        return cls(per_s, max(1.0, per_s * burst_s))

    def scaled(self, per_message: float, burst_s: float, least_burst: float) -> RateLimit:
        """The budget in bytes or readings that goes with this message limit: `per_message` of them
        for each message of its rate, a burst of `burst_s` seconds of that but at least
        `least_burst`. No limit stays no limit, and `per_message` 0 turns the budget off."""
        if self.per_s <= 0 or per_message <= 0:
            return RateLimit(0.0, 0.0)
        per_s = self.per_s * per_message
        return RateLimit(per_s, max(least_burst, per_s * burst_s))


class _Account:
    """One account's three buckets, the limit they were shaped by, and when they were last filled."""

    __slots__ = ("messages", "bytes", "readings", "last", "limit", "shape")

    def __init__(self, limit: RateLimit, shape: tuple[RateLimit, RateLimit, RateLimit], now_s: float) -> None:
        self.limit, self.shape, self.last = limit, shape, now_s
        self.messages, self.bytes, self.readings = shape[0].burst, shape[1].burst, shape[2].burst


class AccountBudgets:
    """Each account's three token buckets, spent in the order the gateway learns the costs: a
    message, then its bytes (before parsing it), then its readings (after). A bucket that refuses
    spends nothing; the ones before it have spent theirs (the message was received, and parsed)."""

    def __init__(
        self,
        *,
        bytes_per_message: float,
        readings_per_message: float,
        volume_burst_s: float,
        largest_payload: int,
        most_readings: int,
        max_senders: int = 200_000,
    ) -> None:
        self._per_message = {"bytes": bytes_per_message, "readings": readings_per_message}
        self._least_burst = {"bytes": float(largest_payload), "readings": float(most_readings)}
        self._volume_burst_s = volume_burst_s
        self._accounts: dict[str, _Account] = {}
        self._shapes: dict[RateLimit, tuple[RateLimit, RateLimit, RateLimit]] = {}  # message limit → all three
        self._max_senders = max_senders

    def __len__(self) -> int:
        return len(self._accounts)

    def budget(self, unit: str, limit: RateLimit) -> RateLimit:
        """The budget in "messages", "bytes" or "readings" that goes with an account's message limit."""
        return self._shape(limit)[("messages", "bytes", "readings").index(unit)]

    def admit(self, sender: str, limit: RateLimit, payload_bytes: int, now_s: float) -> str | None:
        """None if a message of `payload_bytes` may be parsed (its message and bytes spent); else
        the unit it is over, "messages" or "bytes"."""
        if limit.per_s <= 0:
            return None
        account = self._refilled(sender, limit, now_s)
        if account.messages < 1.0:
            return "messages"
        account.messages -= 1.0
        in_bytes = account.shape[1]
        if in_bytes.per_s > 0:
            # A payload over the largest allowed costs a full bucket, so a full bucket lets it on
            # to the parser, which calls it `oversized`.
            cost = payload_bytes if payload_bytes < in_bytes.burst else in_bytes.burst
            if account.bytes < cost:
                return "bytes"
            account.bytes -= cost
        return None

    def admit_readings(self, sender: str, limit: RateLimit, readings: int, now_s: float) -> bool:
        """Whether a parsed message's `readings` fit the account's readings budget (then spent)."""
        if limit.per_s <= 0 or not readings:
            return True
        account = self._refilled(sender, limit, now_s)
        if account.shape[2].per_s <= 0:
            return True
        if account.readings < readings:
            return False
        account.readings -= readings
        return True

    def _shape(self, limit: RateLimit) -> tuple[RateLimit, RateLimit, RateLimit]:
        shape = self._shapes.get(limit)
        if shape is None:
            shape = self._shapes[limit] = (
                limit,
                limit.scaled(self._per_message["bytes"], self._volume_burst_s, self._least_burst["bytes"]),
                limit.scaled(self._per_message["readings"], self._volume_burst_s, self._least_burst["readings"]),
            )
        return shape

    def _refilled(self, sender: str, limit: RateLimit, now_s: float) -> _Account:
        account = self._accounts.get(sender)
        if account is None:
            if len(self._accounts) >= self._max_senders:
                self._forget_full(now_s)
            account = self._accounts[sender] = _Account(limit, self._shape(limit), now_s)
            return account
        if account.limit is not limit:  # a new limit (the registry was read again): the same shape, or a new one
            account.limit, account.shape = limit, self._shape(limit)
        elapsed = now_s - account.last
        if elapsed > 0:  # the gateway checks a whole batch at one time: most calls refill nothing
            account.last = now_s
            messages, in_bytes, readings = account.shape
            filled = account.messages + elapsed * messages.per_s
            account.messages = filled if filled < messages.burst else messages.burst
            filled = account.bytes + elapsed * in_bytes.per_s
            account.bytes = filled if filled < in_bytes.burst else in_bytes.burst
            filled = account.readings + elapsed * readings.per_s
            account.readings = filled if filled < readings.burst else readings.burst
        return account

    def _forget_full(self, now_s: float) -> None:
        """Bounded memory: drop accounts quiet long enough that every bucket of theirs is full again
        (forgetting them gives nothing away), or else the older half. The ACL lets only registered
        accounts publish, so this is a backstop, not the usual path."""
        idle = [s for s, account in self._accounts.items() if now_s - account.last > _refill_s(account.shape)]
        for sender in idle or list(self._accounts)[: len(self._accounts) // 2]:
            del self._accounts[sender]


def _refill_s(shape: tuple[RateLimit, RateLimit, RateLimit]) -> float:
    """Seconds an empty account takes to fill every bucket again."""
    return max(limit.burst / limit.per_s for limit in shape if limit.per_s > 0)
