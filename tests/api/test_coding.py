"""api/coding.py on its own: a compressed body is taken only whole, within the cap, however it is
split between the event loop's step and the rest."""
from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.api import coding
from broker.api.coding import BadCoding, Inflation, TooLarge


def inflate(coding: str, raw: bytes, limit: int = 1 << 20, budget: int = 1 << 16) -> bytes:
    inflation = Inflation(coding, raw, limit)
    return inflation.body() if inflation.step(budget) else inflation.rest()


def _raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


CODERS = {"gzip": gzip.compress, "deflate": zlib.compress, "raw deflate": _raw_deflate}


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000) | st.text(max_size=2000).map(str.encode), coder=st.sampled_from(sorted(CODERS)),
       budget=st.integers(1, 5000), cut=st.integers(1, 10**6))
def test_whole_bodies_inflate_and_every_cut_is_refused(data: bytes, coder: str, budget: int, cut: int) -> None:
    coding = "gzip" if coder == "gzip" else "deflate"
    whole = CODERS[coder](data)
    assert inflate(coding, whole, budget=budget) == data
    short = whole[:cut % len(whole)]
    if short:   # an empty body is empty in any coding
        with pytest.raises(BadCoding):
            inflate(coding, short, budget=budget)


def test_gzip_members_follow_one_another_and_anything_else_after_the_end_is_refused() -> None:
    assert inflate("gzip", gzip.compress(b"ab") + gzip.compress(b"") + gzip.compress(b"cd")) == b"abcd"
    for tail, words in ((b"junk", "not another gzip member"), (b"\0" * 4, "not another gzip member"),
                        (gzip.compress(b"cd")[:-3], "cut short")):
        with pytest.raises(BadCoding, match=words):
            inflate("gzip", gzip.compress(b"ab") + tail)
    with pytest.raises(BadCoding, match="after the end of the deflate data"):
        inflate("deflate", zlib.compress(b"ab") + zlib.compress(b"cd"))


def test_the_cap_counts_inflated_bytes_and_inflation_stops_there() -> None:
    data = b"0" * 100_000
    assert inflate("gzip", gzip.compress(data), limit=100_000) == data
    with pytest.raises(TooLarge):
        inflate("gzip", gzip.compress(data), limit=99_999)
    bomb = gzip.compress(b"0" * (64 << 20))   # ~64 KB that would inflate to 64 MiB
    inflation = Inflation("gzip", bomb, 1 << 20)
    with pytest.raises(TooLarge):
        inflation.rest()
    assert sum(map(len, inflation._parts)) == (1 << 20) + 1, "no more than one byte past the cap was made"


def test_what_is_not_the_coding_says_so() -> None:
    with pytest.raises(BadCoding, match=r"not gzip data \(incorrect header check\)"):
        inflate("gzip", b"{}")
    with pytest.raises(BadCoding, match="not deflate data"):
        inflate("deflate", b"not deflate at all" * 10)
    assert inflate("gzip", b"") == b"" and inflate("deflate", b"") == b""


def test_many_gzip_members_are_linear_off_the_loop_and_bounded() -> None:
    """Fed whole, each member's end copied the rest of the body: 2 MiB of empty members held the
    event loop for 3-4 s (the security probe). Now the loop's step stops after a bounded effort and
    hands the rest to a thread, and a body of more than MAX_MEMBERS members is refused."""
    empty = gzip.compress(b"")
    many = Inflation("gzip", empty * coding.MAX_MEMBERS, 1 << 20)
    assert not many.step(), "the step on the event loop handed the rest on"
    assert many.rest() == b""
    with pytest.raises(BadCoding, match="more than 10,000 gzip members"):
        Inflation("gzip", empty * (coding.MAX_MEMBERS + 1), 1 << 20).rest()
    big = gzip.compress(b"x" * 100) * 1000   # a member's end is no longer a copy of what follows
    assert inflate("gzip", big) == b"x" * 100_000
