"""The ids of the last events folded into one account, so that the Kafka fold can drop a
repeated submission: the Kafka log, unlike the SQLite one, cannot refuse it at append.

The memory is bounded by a count of events, not by time (the fold has no clock of its own, and
event time would let an account's history import keep every id): an id is forgotten once
`KEPT` other events have been folded into the account after it.
"""

from __future__ import annotations

from hashlib import blake2b

KEPT = 256  # event ids remembered per account
_WIDTH = 8  # bytes of digest per id


def _digest(event_id: str) -> bytes:
    # Not `hash()`: a str's hash differs from one process to the next.
    return blake2b(event_id.encode(), digest_size=_WIDTH).digest()


class RecentIds:
    """The last `KEPT` distinct ids added, as 8-byte BLAKE2b digests in a ring of bytes.

    A digest rather than the id, so the pickled account grows by 8 bytes per id whatever the
    ids look like (a UUID is 36 characters); two of an account's recent ids sharing a digest
    (odds about 2^-56 per event) would drop the later event. One flat buffer rather than a set:
    a set of 256 digests costs ~20 KB of memory per account, the buffer 2 KB, and a search of
    it is one C call.
    """

    __slots__ = ("_next", "_ring")

    def __init__(self) -> None:
        self._ring = bytearray()
        self._next = 0  # where the oldest digest sits once the ring is full

    def add(self, event_id: str) -> bool:
        """Remembers `event_id`, forgetting the oldest when full; False if it was already
        remembered (and then nothing changes: a repeat does not renew it)."""
        digest = _digest(event_id)
        ring = self._ring
        at = ring.find(digest)
        while at >= 0:
            if at % _WIDTH == 0:
                return False
            at = ring.find(digest, at + 1)  # straddled two digests: not this one
        if len(ring) < KEPT * _WIDTH:
            ring += digest
        else:
            start = self._next
            ring[start : start + _WIDTH] = digest
            self._next = (start + _WIDTH) % len(ring)
        return True

    def __len__(self) -> int:
        return len(self._ring) // _WIDTH

    def __getstate__(self) -> bytes:
        """The digests oldest first, so a state pickled under another `KEPT` loads."""
        ring, start = self._ring, self._next
        return bytes(ring[start:] + ring[:start]) if start else bytes(ring)

    def __setstate__(self, state: bytes) -> None:
        self._ring = bytearray(state[-KEPT * _WIDTH :])
        self._next = 0
