"""Reading a Kafka record's headers, as aiokafka (a sequence of pairs) or Faust (a dict) give
them."""

from __future__ import annotations

from typing import Any


def header(headers: Any, name: str) -> bytes | None:
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    for key, value in items:
        if key == name:
            return bytes(value)
    return None
