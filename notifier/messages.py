"""What a message says, in Indonesian or English: the alert's event with its device, district,
value, threshold, ISPU category or Siaga level, a link to the alert on the page and an acknowledge
link. Pure functions of the rows read; the channels only wrap them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

ACTIONS = {
    "id": {
        "raised": "Peringatan baru",
        "escalated": "Peringatan meningkat",
        "acknowledged": "Ditangani",
        "cleared": "Selesai",
    },
    "en": {"raised": "New alert", "escalated": "Alert escalated", "acknowledged": "Acknowledged", "cleared": "Cleared"},
}
SEVERITY = {
    "id": {"critical": "kritis", "major": "berat", "minor": "sedang", "warning": "ringan"},
    "en": {"critical": "critical", "major": "major", "minor": "minor", "warning": "warning"},
}
LABELS = {
    "id": {
        "device": "Perangkat",
        "district": "Kecamatan",
        "value": "Nilai",
        "threshold": "Ambang",
        "ispu": "Kategori ISPU",
        "siaga": "Status",
        "by": "Oleh",
        "open": "Lihat di halaman",
        "ack": "Tandai ditangani",
        "severity": "Tingkat",
        "count": "Jumlah sinyal",
        "test": "Pesan uji dari kotacerdas: saluran ini berfungsi.",
        "digest": "Ringkasan: {n} pemberitahuan ditahan agar tidak membanjiri",
        "at": "Waktu",
    },
    "en": {
        "device": "Device",
        "district": "District",
        "value": "Value",
        "threshold": "Threshold",
        "ispu": "ISPU category",
        "siaga": "Status",
        "by": "By",
        "open": "Open on the page",
        "ack": "Acknowledge",
        "severity": "Severity",
        "count": "Signals",
        "test": "Test message from kotacerdas: this channel works.",
        "digest": "Digest: {n} notifications held back to avoid a flood",
        "at": "At",
    },
}


@dataclass(frozen=True, slots=True)
class Message:
    """One message, channel-neutral: a subject, lines of text, links, and the JSON a webhook gets."""

    subject: str
    lines: list[str]
    alert_url: str | None = None
    ack_url: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    def text(self, language: str) -> str:
        parts = [self.subject, "", *self.lines]
        if self.alert_url:
            parts.append(f"{LABELS[language]['open']}: {self.alert_url}")
        if self.ack_url:
            parts.append(f"{LABELS[language]['ack']}: {self.ack_url}")
        return "\n".join(parts)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def threshold_of(alert_type: str, details: dict[str, Any]) -> str | None:
    """The threshold an alert's details name, as people read it (processing/rules.py writes them)."""
    if alert_type == "flood_siaga" and details.get("thresholds_cm"):
        levels = details["thresholds_cm"]  # Siaga 3, 2, 1 (processing/rules.py)
        return " / ".join(f"Siaga {3 - i}: {v:g} cm" for i, v in enumerate(levels))
    if "limit_dba" in details:
        return f"{details['limit_dba']:g} dB(A)"
    if "usual_min_flow" in details:
        return f"{details['usual_min_flow']:g} m3/h"
    return None


def event_message(row: dict[str, Any], language: str, page_url: str, ack_url: str | None) -> Message:
    """The message for one alert event. `row`: the event joined with its alert and device."""
    labels = LABELS[language]
    details: dict[str, Any] = row.get("details") or {}
    severity = SEVERITY[language].get(row["severity"], row["severity"])
    subject = f"[{row['city']}] {ACTIONS[language][row['action']]}: {row['alert_type']} {row['device_id']} ({severity})"
    lines = [
        row["message"],
        f"{labels['device']}: {row['device_id']} ({row['device_type']})",
        f"{labels['district']}: {row['district'] or '-'}",
        f"{labels['value']}: {_number(row['last_value'])} ({row['metric']})",
        f"{labels['severity']}: {severity}",
    ]
    threshold = threshold_of(row["alert_type"], details)
    if threshold:
        lines.append(f"{labels['threshold']}: {threshold}")
    if "category" in details:
        lines.append(f"{labels['ispu']}: {details['category']} (ISPU {details.get('ispu', '-')})")
    if "siaga" in details:
        lines.append(f"{labels['siaga']}: Siaga {details['siaga']}")
    if row["count"] and row["count"] > 1:
        lines.append(f"{labels['count']}: {row['count']}")
    if row["action"] in ("acknowledged", "cleared", "escalated"):
        lines.append(f"{labels['by']}: {row['actor']}" + (f" ({row['comment']})" if row.get("comment") else ""))
    at: dt.datetime = row["at"]
    lines.append(f"{labels['at']}: {at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC")
    alert_url = f"{page_url.rstrip('/')}/#alert={row['alert_id']}"
    payload = {
        "kind": "alert_event",
        "event_id": row["event_id"],
        "action": row["action"],
        "actor": row["actor"],
        "at": at.isoformat(),
        "comment": row.get("comment"),
        "alert": {
            "alert_id": row["alert_id"],
            "city": row["city"],
            "domain": row["domain"],
            "district": row["district"],
            "device_id": row["device_id"],
            "device_type": row["device_type"],
            "alert_type": row["alert_type"],
            "metric": row["metric"],
            "severity": row["severity"],
            "state": row["state"],
            "message": row["message"],
            "value": row["last_value"],
            "count": row["count"],
            "threshold": threshold,
            "ispu_category": details.get("category"),
            "siaga": details.get("siaga"),
            "url": alert_url,
        },
        "ack_url": ack_url,
    }
    return Message(subject, lines, alert_url, ack_url, payload)


def test_message(city: str, language: str) -> Message:
    text = LABELS[language]["test"]
    return Message(f"[{city}] kotacerdas", [text], payload={"kind": "test", "city": city, "text": text})


def digest_message(city: str, language: str, items: list[dict[str, Any]], page_url: str) -> Message:
    """One message for the events held back over a subscription's limit: how many, and each in a line."""
    labels = LABELS[language]
    subject = f"[{city}] " + labels["digest"].format(n=len(items))
    lines = [
        f"{ACTIONS[language][i['action']]}: {i['alert_type']} {i['device_id']} "
        f"({SEVERITY[language].get(i['severity'], i['severity'])}) #{i['alert_id']}"
        for i in items
    ]
    payload = {
        "kind": "digest",
        "city": city,
        "count": len(items),
        "events": [
            {k: i[k] for k in ("event_id", "alert_id", "action", "device_id", "alert_type", "severity")} for i in items
        ],
        "url": page_url.rstrip("/") + "/",
    }
    return Message(subject, lines, payload=payload)
