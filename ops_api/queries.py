"""Every read of the database schema the ops API makes, in one place."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row


async def list_devices(conn: AsyncConnection, city: str | None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        """SELECT d.device_id, d.city, d.domain, d.device_type, d.district, d.lat, d.lon, d.enabled,
                  max(l.ts) AS last_seen,
                  coalesce(jsonb_object_agg(l.metric, jsonb_build_object('value', l.value, 'unit', l.unit,
                                                                        'ts', l.ts))
                           FILTER (WHERE l.metric IS NOT NULL), '{}'::jsonb) AS latest
           FROM devices d LEFT JOIN latest_values l USING (device_id)
           WHERE (%(city)s::text IS NULL OR d.city = %(city)s)
           GROUP BY d.device_id ORDER BY d.device_id""",
        {"city": city})
    return await cur.fetchall()


async def device_exists(conn: AsyncConnection, device_id: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,))
    return await cur.fetchone() is not None


async def latest_values(conn: AsyncConnection, device_id: str) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT metric, value, unit, ts FROM latest_values WHERE device_id = %s ORDER BY metric",
                      (device_id,))
    return await cur.fetchall()


async def last_reading_time(conn: AsyncConnection) -> Any:
    cur = await conn.execute("SELECT max(ts) FROM latest_values")
    row = await cur.fetchone()
    return row[0] if row else None
