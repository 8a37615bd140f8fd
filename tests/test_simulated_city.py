"""`kota simulate` against the real stack: every acknowledged reading is stored, in all three
message forms; then `kota score` reads back what the platform detected."""

import datetime as dt
import json

import pytest

from tests.helpers import kota_ok, query, unique_id, wait_for_stored

pytestmark = pytest.mark.stack


def test_a_simulated_morning_is_stored_exactly_and_scored(pipeline, tmp_path):
    city = unique_id("sim")  # the test stack outlives a run: a city of its own
    # Ten simulated hours from the last midnight (WIB) that leaves them over an hour before now:
    # always the same time of day (a morning: the afternoon showers that raise the gates on their
    # own stay out of it), and inside the gateway's and the processor's windows (at most 35 h old).
    wib = dt.timezone(dt.timedelta(hours=7))
    latest_start = dt.datetime.now(wib) - dt.timedelta(hours=11)
    start = latest_start.replace(hour=0, minute=0, second=0, microsecond=0)
    labels, counts, out = tmp_path / "labels.json", tmp_path / "counts.json", tmp_path / "score"
    kota_ok(
        pipeline,
        "simulate",
        "--city",
        city,
        "--devices",
        "24",
        "--seed",
        "11",
        "--start",
        start.isoformat(),
        "--hours",
        "10",
        "--interval",
        "60",
        "--labels",
        str(labels),
        "--counts",
        str(counts),
    )
    sent = json.loads(counts.read_text())
    assert sent["ticks"] == 600
    assert sent["acknowledged_readings"] == sent["readings"] > 24 * 600 * 1.5

    assert (
        wait_for_stored(pipeline, city, sent["readings"], timeout_s=120, what="every acknowledged reading stored")
        == sent["readings"]
    )
    # (a third of the devices speak each form: gateway JSON, gateway SenML, their own topic; any form
    # the gateway refused would leave the count short)

    document = json.loads(labels.read_text())
    kinds = {x["kind"] for x in document["labels"]}
    assert "flood_wave" in kinds
    report = kota_ok(pipeline, "score", "--labels", str(labels), "--out", str(out))
    assert f"Scorecard for {city}" in report
    flood = next(line for line in report.splitlines() if line.startswith("flood_wave"))
    gates = sum(1 for x in document["labels"] if x["kind"] == "flood_wave")
    assert flood.split()[1:4] == [str(gates), str(gates), "1.00"], report  # every gate's wave was caught
    assert int(flood.split()[4]) == gates, "and each raised an alert (Siaga)"
    pictures = list(out.glob("*.png"))
    assert len(pictures) == 1 and pictures[0].stat().st_size > 10_000
    assert (out / f"{city}-scorecard.txt").read_text() == report[: report.index("report:")]

    # Street lights switch off at 06:00 (and the morning's first readings find them on): a switched
    # load that is off is not a dip, nor coming back on a spike (processing/kernels.SWITCHED).
    lamps = query(pipeline, "SELECT count(*) FROM devices WHERE city = %s AND device_type = 'street_light'", (city,))
    assert lamps[0][0] >= 1
    labelled = sorted({x["device_id"] for x in document["labels"]})
    unlabelled_lamp_anomalies = query(
        pipeline,
        """SELECT a.device_id, a.reason, a.ts FROM anomalies a JOIN devices d USING (device_id)
                     WHERE d.city = %s AND a.metric = 'powerConsumption' AND NOT a.device_id = ANY(%s)""",
        (city, labelled),
    )
    assert unlabelled_lamp_anomalies == []
