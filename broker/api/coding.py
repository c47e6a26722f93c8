"""Request bodies in a Content-Encoding: `gzip` (RFC 1952, one member or several) and `deflate`
(RFC 9110 8.4.1.2: zlib's format; a raw deflate stream too, as many clients send and aiohttp
takes). Inflated here, not by aiohttp's parser (http_app runs it with auto_decompress off), for
two reasons:

- A body must be whole. aiohttp's decoder never looks whether a gzip stream reached its end, so a
  gzip body cut anywhere before its trailer was taken as the prefix it inflates to: a Timeplus
  `lines` ingest cut in half stored half of its rows and answered 200. Here a body ends with its
  stream (gzip's CRC-32 and length checked, by zlib), and bytes after it are refused.
- Its cost is bounded by what it inflates to, not by what was sent: output is taken at most
  `limit + 1` bytes at a time, so a 1 KiB body that would inflate to 1 GiB costs one cap.
"""
from __future__ import annotations

import zlib

GZIP, DEFLATE = "gzip", "deflate"
CODINGS = frozenset({GZIP, DEFLATE})
# Inflated on the caller's thread up to this much output, or from this much input; the rest (a
# big or very compressible body) by `rest` in a thread, off the event loop.
INLINE_BYTES = 1 << 20
INLINE_EFFORT = 256 * 1024
CHUNK = 16 * 1024
MEMBER_EFFORT = 1024   # a gzip member's start (a new inflater) costs about as much as this much input
# A body of concatenated gzip files has a few; 10,000 empty ones are 200 KB that cost ~15 ms.
MAX_MEMBERS = 10_000


class TooLarge(Exception):
    """The body inflates past the limit."""


class BadCoding(Exception):
    """The body is not what its Content-Encoding says: not that format, cut short, or followed
    by other bytes."""


class Inflation:
    """One body's inflation: `step` on the event loop, then `rest` (in a thread when `done` is
    False), then `body`. The input is fed in CHUNK pieces of a view of the body, so what zlib copies
    at a member's end (the input it did not use) is at most a piece: fed whole, a body of many
    small members was copied once per member, a quadratic cost on the event loop."""

    def __init__(self, coding: str, raw: bytes, limit: int) -> None:
        self.coding, self.limit = coding, limit
        self._parts: list[bytes] = []
        self._size = 0
        self._raw = memoryview(raw)
        self._pos = 0          # of the next piece of the body to feed
        self._tail = b""       # the part of a piece fed that zlib has not taken yet
        self._inflater = _inflater(coding, raw)
        self._member = 0   # which gzip member is being inflated
        self.done = not raw   # an empty body is empty in any coding (as aiohttp takes it)

    def step(self, budget: int = INLINE_BYTES, effort: int = INLINE_EFFORT) -> bool:
        """Inflates up to about `budget` bytes of output from about `effort` bytes of input (a
        member counting MEMBER_EFFORT more); whether the body is complete. Raises TooLarge and
        BadCoding."""
        target = min(self._size + budget, self.limit + 1)
        spent = 0
        while not self.done and self._size < target and spent < effort:
            d, want = self._inflater, target - self._size
            data = self._tail or self._raw[self._pos:self._pos + CHUNK]
            if not self._tail:
                self._pos += len(data)
            spent += len(data)
            try:
                chunk = d.decompress(data, want)
            except zlib.error as exc:
                if self._member:
                    raise BadCoding(f"the bytes after the end of the gzip data are not another gzip member "
                                    f"({_why(exc)})") from None
                raise BadCoding(f"not {self.coding} data ({_why(exc)})") from None
            self._parts.append(chunk)
            self._size += len(chunk)
            if self._size > self.limit:
                raise TooLarge
            left = len(self._raw) - self._pos   # not fed yet
            if d.eof:   # a stream ended: gzip may go on with another member (RFC 1952 2.2)
                self._tail = d.unused_data
                if not self._tail and not left:
                    self.done = True
                elif self.coding != GZIP:
                    raise BadCoding(f"{len(self._tail) + left} bytes after the end of the deflate data")
                elif self._member + 1 >= MAX_MEMBERS:
                    raise BadCoding(f"more than {MAX_MEMBERS:,} gzip members")
                else:
                    self._inflater = _inflater(GZIP, b"")
                    self._member += 1
                    spent += MEMBER_EFFORT
            else:
                self._tail = d.unconsumed_tail
                # every byte taken and less output than asked for: nothing is held back, and the
                # stream has not ended (a full `want` may leave output held: asked again, for b"")
                if not self._tail and not left and len(chunk) < want:
                    raise BadCoding(f"the {self.coding} data is cut short: it stops before the end of its stream")
        return self.done

    def rest(self) -> bytes:
        """The whole body: inflates what `step` left. Raises TooLarge and BadCoding."""
        while not self.step(self.limit + 1, len(self._raw) + MAX_MEMBERS * MEMBER_EFFORT + CHUNK):
            pass
        return self.body()

    def body(self) -> bytes:
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)


def _inflater(coding: str, raw: bytes) -> zlib._Decompress:
    if coding == GZIP:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)   # gzip's header and trailer only
    # zlib's two header bytes name the deflate method in their low nibble (RFC 1950); a raw stream
    # (no header) starts with a block header instead - aiohttp's rule for telling them apart
    wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    return zlib.decompressobj(wbits)


def _why(exc: zlib.error) -> str:
    """zlib's reason without its numbers: "Error -3 while decompressing data: incorrect header check"."""
    return str(exc).rsplit(": ", 1)[-1][:80]
