"""A device's recent rejections (ops_api/rejections.py): bounded whatever is sent, newest first,
and made of text and numbers only, whatever a dead letter holds."""

import base64
import datetime as dt

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kota.contract import Reason, Rejection, encode_dead_letter
from ops_api.rejections import KEPT_MESSAGE_CHARS, KEPT_MESSAGES, KEPT_PAYLOAD_BYTES, RecentRejections, summary

SENDERS = [f"dev-{i}" for i in range(12)]


def letter(topic: str, payload: bytes = b"{}", reasons: int = 1, received_ms: int = 1_795_000_000_000) -> dict:
    rejections = [Rejection(Reason.OUT_OF_RANGE, f"value {i} is outside") for i in range(reasons)]
    return orjson.loads(
        encode_dead_letter(topic=topic, payload=payload, rejections=rejections, received_ms=received_ms)
    )


CITIES = ["bandung", "jakarta", "bogor"]
topics = st.one_of(
    st.tuples(st.sampled_from(CITIES), st.sampled_from(SENDERS)).map(
        lambda cd: f"kota/{cd[0]}/environment/{cd[1]}/telemetry"
    ),
    st.tuples(st.sampled_from(CITIES), st.sampled_from(SENDERS)).map(lambda cg: f"kota/{cg[0]}/gateway/{cg[1]}/senml"),
    st.text(max_size=40),  # not a telemetry topic: kept under nobody
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(topics, st.binary(max_size=2000), st.integers(1, 30)), max_size=120),
    st.integers(1, 5),
    st.integers(1, 6),
)
def test_kept_dead_letters_stay_bounded_newest_first(sent, per_sender, senders):
    recent = RecentRejections(per_sender=per_sender, senders=senders)
    kept_by_sender: dict[tuple[str, str], list[int]] = {}
    for number, (topic, payload, reasons) in enumerate(sent):
        if recent.add(letter(topic, payload, reasons, received_ms=1_795_000_000_000 + number)):
            _, city, _, sender, *_ = topic.split("/")
            kept_by_sender.setdefault((city, sender), []).append(number)
    assert len(recent) <= senders
    assert len(recent) == sum(1 for city, sender in kept_by_sender if recent.of(city, sender))
    for (city, sender), numbers in kept_by_sender.items():
        shown = recent.of(city, sender)
        assert len(shown) <= per_sender
        # Newest first, and always the newest: a sender forgotten and rejected again keeps only what
        # came since, which is the start of the same list.
        expected = [1_795_000_000_000 + n for n in reversed(numbers[-per_sender:])]
        got = [round(s["received_at"].timestamp() * 1000) for s in shown]
        assert got == expected[: len(got)]
        for s in shown:
            assert len(s["rejections"]) <= KEPT_MESSAGES
            assert len(s["payload_start_b64"]) <= 4 * ((KEPT_PAYLOAD_BYTES + 2) // 3)
    assert recent.of("bandung", "nobody-at-all") == []


def test_a_summary_counts_every_reason_but_keeps_few_messages_and_little_payload():
    payload = b"\x1b[2J" + b"x" * 5000
    shown = summary(letter("kota/bandung/environment/dev-1/telemetry", payload, reasons=12))
    assert shown["reasons"] == {"out_of_range": 12}
    assert shown["rejections_total"] == 12
    assert [r["reason"] for r in shown["rejections"]] == ["out_of_range"] * KEPT_MESSAGES
    assert shown["payload_bytes"] == len(payload)
    assert shown["received_at"] == dt.datetime.fromtimestamp(1_795_000_000, dt.UTC)
    assert base64.b64decode(shown["payload_start_b64"]) == payload[:KEPT_PAYLOAD_BYTES]


def test_the_least_recently_rejected_sender_is_forgotten_first():
    recent = RecentRejections(per_sender=2, senders=2)
    for device in ("dev-1", "dev-2", "dev-1", "dev-3"):  # dev-2 is then the least recently rejected
        recent.add(letter(f"kota/bandung/environment/{device}/telemetry"))
    assert recent.of("bandung", "dev-2") == []
    assert len(recent.of("bandung", "dev-1")) == 2 and len(recent.of("bandung", "dev-3")) == 1


def test_a_city_whose_devices_flood_pushes_out_its_own_letters_not_another_citys():
    recent = RecentRejections(per_sender=2, senders=10)
    for device in ("dev-1", "dev-2", "dev-3"):
        recent.add(letter(f"kota/bogor/environment/{device}/telemetry"))
    for i in range(500):  # one city's many devices, all refused, all more recent than bogor's
        recent.add(letter(f"kota/bandung/environment/flood-{i}/telemetry"))
    assert len(recent) == 10
    assert all(len(recent.of("bogor", device)) == 1 for device in ("dev-1", "dev-2", "dev-3"))
    assert recent.senders_of("bandung") == 7
    assert recent.of("bandung", "flood-499") and not recent.of("bandung", "flood-492")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CITIES), st.sampled_from(SENDERS)), max_size=300), st.integers(1, 12))
def test_no_city_is_pushed_below_its_fair_share(rejected, senders):
    """A city is forgotten from only while it holds the most senders: one that has kept fewer than
    an even share (of the cities seen) never loses a sender to another city's letters."""
    recent = RecentRejections(per_sender=1, senders=senders)
    for city, sender in rejected:
        before = {c: recent.senders_of(c) for c in CITIES}
        recent.add(letter(f"kota/{city}/environment/{sender}/telemetry"))
        for other in CITIES:
            if other != city and recent.senders_of(other) < before[other]:
                assert before[other] >= max(before.values()), (other, before)


def test_an_id_moved_to_another_city_does_not_take_its_letters_along():
    recent = RecentRejections()
    recent.add(letter("kota/bandung/environment/dev-1/telemetry", b"bandung's"))
    assert recent.of("surabaya", "dev-1") == []
    assert len(recent.of("bandung", "dev-1")) == 1


def test_letters_older_than_asked_are_not_shown():
    recent = RecentRejections()
    for ms in (1_795_000_000_000, 1_795_000_100_000):
        recent.add(letter("kota/bandung/environment/dev-1/telemetry", received_ms=ms))
    since = dt.datetime.fromtimestamp(1_795_000_050, dt.UTC)
    assert [s["received_at"] for s in recent.of("bandung", "dev-1", since)] == [
        dt.datetime.fromtimestamp(1_795_000_100, dt.UTC)
    ]


def test_a_summary_of_any_record_is_small_text_and_numbers_or_refused():
    """What the gateway never writes, if it ever did: a summary is made or add raises (which the
    reader logs and skips), and what is made is cut."""
    long = "\\U000e0001" * 200
    shown = summary({"topic": "kota/b/environment/d/telemetry", "rejections": [{"reason": "x", "message": long}] * 9})
    assert len(shown["rejections"]) == KEPT_MESSAGES
    assert all(len(r["message"]) <= KEPT_MESSAGE_CHARS for r in shown["rejections"])
    old = summary({"v": 1, "reason": "out_of_range", "message": "m", "topic": "t", "payload_b64": "e30="})
    assert old["reasons"] == {"out_of_range": 1} and base64.b64decode(old["payload_start_b64"]) == b"{}"
