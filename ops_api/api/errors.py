"""Error answers every route documents: a stable `detail` string clients can key on."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    detail: str


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        401: ("no token, or a wrong or revoked one", "missing bearer token"),
        403: ("the caller's role may not do this", "role operator may not manage devices"),
        404: ("not found in the caller's cities", "device not found"),
        409: ("the change conflicts with the current state", "alert is already acknowledged"),
    }
    return {
        code: {
            "model": Problem,
            "description": text[code][0],
            "content": {"application/json": {"example": {"detail": text[code][1]}}},
        }
        for code in codes
    }


READ = responses(401, 404)
