"""The DIS signature verifier (broker/auth/signing.py) against shared/spec/dis-api.md section 7: the
three test vectors and the canonical request text, each error code, and junk headers."""
from __future__ import annotations

import hashlib
from calendar import timegm
from time import strptime
from typing import Callable

import pytest
from dis_signer import sign
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.auth import Role
from broker.auth.credentials import parse_credentials
from broker.auth.signing import canonical_query, canonical_request, canonical_uri, string_to_sign, verify
from broker.errors import BrokerError, ErrorCode

DATE = "20240101T000000Z"
NOW = float(timegm(strptime(DATE, "%Y%m%dT%H%M%SZ")))
HEADERS = {"Content-Type": "application/json", "User-Agent": "huaweicloud-usdk-python/3.0; test",
           "X-Project-Id": "proj123", "X-Sdk-Date": DATE, "Host": "127.0.0.1:8080"}
SIGNED = "content-type;host;user-agent;x-project-id;x-sdk-date"
BODY = b'{"stream_name": "s1", "records": [{"data": "aGVsbG8=", "partition_key": "k1"}]}'
CURSORS = "cursor-type=AT_SEQUENCE_NUMBER&partition-id=0&starting-sequence-number=0&stream-name=s1"
VECTORS = [
    ("POST", "/v2/proj123/records", "", BODY, "/v2/proj123/records/", "",
     "a1a3e69e3fd5d0776377eba86ecf9a987f14500775c06111d1850588ff82d70b"),
    ("GET", "/v2/proj123/cursors", CURSORS, b"", "/v2/proj123/cursors/", CURSORS,
     "a292b1634bfc92275b94c0335e2e6872c4a0d6f338e70df1532bdacd2e07d216"),
    ("GET", "/v2/proj123/streams", "limit=10&start_stream_name=a%20b%2Fc", b"", "/v2/proj123/streams/",
     "limit=10&start_stream_name=a%20b%2Fc", "7da519aa42e95a4c7b2bd2cd2c24f5ff7cf70730491ded5ef70a33ef7699f10e"),
]
CANONICAL = """POST
/v2/proj123/records/

content-type:application/json
host:127.0.0.1:8080
user-agent:huaweicloud-usdk-python/3.0; test
x-project-id:proj123
x-sdk-date:20240101T000000Z

content-type;host;user-agent;x-project-id;x-sdk-date
95624b206bf09e02cfcd27080233872c4e1f59067b77222ba3eca69e6d826858"""
CREDS = parse_credentials({"access_keys": [{"ak": "AKEXAMPLE", "sk": "SKEXAMPLE", "project_id": "proj123",
                                            "role": "producer"}]}, "test")


def lookup(headers: dict[str, str]) -> Callable[[str], str | None]:
    lower = {k.lower(): v for k, v in headers.items()}
    return lambda name: lower.get(name.lower())


def authorization(sig: str, ak: str = "AKEXAMPLE", signed: str = SIGNED) -> dict[str, str]:
    return {**HEADERS, "Authorization": f"SDK-HMAC-SHA256 Access={ak}, SignedHeaders={signed}, Signature={sig}"}


def code_of(fn: Callable[[], object]) -> ErrorCode:
    with pytest.raises(BrokerError) as info:
        fn()
    return info.value.code


@pytest.mark.parametrize(("method", "path", "query", "body", "uri", "canon_query", "sig"), VECTORS)
def test_the_spec_vectors_verify(method: str, path: str, query: str, body: bytes, uri: str, canon_query: str,
                                 sig: str) -> None:
    assert canonical_uri(path) == uri
    assert canonical_query(query) == canon_query
    principal = verify(CREDS, method, path, query, lookup(authorization(sig)), body, NOW)
    assert (principal.project, principal.role, principal.name) == ("proj123", Role.PRODUCER, "AKEXAMPLE")


@pytest.mark.parametrize(("method", "path", "query", "body", "uri", "canon_query", "sig"), VECTORS)
def test_the_independent_test_signer_reproduces_the_vectors(method: str, path: str, query: str, body: bytes,
                                                            uri: str, canon_query: str, sig: str) -> None:
    signed = sign("AKEXAMPLE", "SKEXAMPLE", method, path, query, HEADERS, body)
    assert signed["Authorization"].endswith(f"Signature={sig}")


def test_the_canonical_request_and_string_to_sign_of_the_first_vector() -> None:
    text = canonical_request("post", "/v2/proj123/records", "", SIGNED.split(";"), lookup(HEADERS),
                             hashlib.sha256(BODY).hexdigest())
    assert text == CANONICAL
    assert string_to_sign(DATE, text).split("\n")[-1] == \
        "adc403b2ae09dd37ef765708bd3f2d86262e701af5ce66934980503286cd4b5c"


def test_a_trailing_slash_and_encoded_paths_canonicalise_alike() -> None:
    assert canonical_uri("/v2/proj123/records/") == "/v2/proj123/records/"
    assert canonical_uri("/v2/p/streams/a%7eb") == "/v2/p/streams/a~b/"
    assert canonical_uri("/v2/p/streams/a%2fb") == "/v2/p/streams/a/b/"
    assert canonical_uri("/v2/p/str%C3%A9am") == "/v2/p/str%C3%A9am/"
    assert canonical_query("b=2&a=x+y&a=1&c") == "a=1&a=x%2By&b=2&c="


def test_replays_inside_the_window_are_accepted() -> None:
    headers = lookup(authorization(VECTORS[0][6]))
    for skew in (0, 899, -899):
        verify(CREDS, "POST", "/v2/proj123/records", "", headers, BODY, NOW + skew)


@pytest.mark.parametrize(("change", "expected"), [
    ({"Authorization": None}, ErrorCode.AUTH_MISSING),
    ({"Authorization": "  "}, ErrorCode.AUTH_MISSING),
    ({"Authorization": "Bearer abc"}, ErrorCode.AUTH_MALFORMED),
    ({"Authorization": f"SDK-HMAC-SHA256 Access=AKEXAMPLE,SignedHeaders={SIGNED},Signature={'0' * 64}"},
     ErrorCode.AUTH_MALFORMED),
    ({"Authorization": f"SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders={SIGNED}, Signature=abc"},
     ErrorCode.AUTH_MALFORMED),
    ({"Authorization": f"SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders=content-type;x-sdk-date, "
                       f"Signature={'0' * 64}"}, ErrorCode.AUTH_MALFORMED),
    ({"Authorization": f"SDK-HMAC-SHA256 Access=AKOTHER, SignedHeaders={SIGNED}, Signature={'0' * 64}"},
     ErrorCode.AUTH_UNKNOWN_KEY),
    ({"X-Sdk-Date": None}, ErrorCode.AUTH_DATE_MISSING),
    ({"X-Sdk-Date": "2024-01-01T00:00:00Z"}, ErrorCode.AUTH_DATE_MALFORMED),
    ({"X-Sdk-Date": "20241301T000000Z"}, ErrorCode.AUTH_DATE_MALFORMED),
    ({"X-Sdk-Date": "20240101T001501Z"}, ErrorCode.AUTH_DATE_SKEW),
    ({"X-Sdk-Date": "20231231T234459Z"}, ErrorCode.AUTH_DATE_SKEW),
    ({"Host": "127.0.0.1:8081"}, ErrorCode.AUTH_BAD_SIGNATURE),
    ({"X-Project-Id": "proj124"}, ErrorCode.AUTH_BAD_SIGNATURE),
    ({"User-Agent": None}, ErrorCode.AUTH_MALFORMED),          # a signed header that is not there
])
def test_each_error_code(change: dict[str, str | None], expected: ErrorCode) -> None:
    headers: dict[str, str] = authorization(VECTORS[0][6])
    for name, value in change.items():
        headers.pop(name, None)
        if value is not None:
            headers[name] = value
    assert code_of(lambda: verify(CREDS, "POST", "/v2/proj123/records", "", lookup(headers), BODY, NOW)) == expected


@pytest.mark.parametrize(("method", "path", "query", "body"), [
    ("POST", "/v2/proj123/records", "", BODY.replace(b"k1", b"k2")),      # the body changed
    ("POST", "/v2/proj123/records", "", b""),
    ("PUT", "/v2/proj123/records", "", BODY),                              # the method
    ("POST", "/v2/proj124/records", "", BODY),                             # the path
    ("POST", "/v2/proj123/records", "x=1", BODY),                          # the query
])
def test_a_changed_request_is_a_bad_signature(method: str, path: str, query: str, body: bytes) -> None:
    headers = lookup(authorization(VECTORS[0][6]))
    assert code_of(lambda: verify(CREDS, method, path, query, headers, body, NOW)) == ErrorCode.AUTH_BAD_SIGNATURE


def test_a_changed_query_is_a_bad_signature() -> None:
    headers = lookup(authorization(VECTORS[1][6]))
    tampered = CURSORS.replace("starting-sequence-number=0", "starting-sequence-number=1")
    assert code_of(lambda: verify(CREDS, "GET", "/v2/proj123/cursors", tampered, headers, b"", NOW)) == \
        ErrorCode.AUTH_BAD_SIGNATURE
    # the same pairs in another order are the same canonical query
    shuffled = "&".join(reversed(CURSORS.split("&")))
    verify(CREDS, "GET", "/v2/proj123/cursors", shuffled, headers, b"", NOW)


def test_a_wrong_secret_is_a_bad_signature() -> None:
    signed = sign("AKEXAMPLE", "SKWRONG", "POST", "/v2/proj123/records", "", HEADERS, BODY)
    assert code_of(lambda: verify(CREDS, "POST", "/v2/proj123/records", "", lookup(signed), BODY, NOW)) == \
        ErrorCode.AUTH_BAD_SIGNATURE


def test_a_content_hash_header_cannot_vouch_for_another_body() -> None:
    """Naming the signed body's hash beside a new body (unsigned header) changes nothing."""
    headers = authorization(VECTORS[0][6])
    headers["X-Sdk-Content-Sha256"] = hashlib.sha256(BODY).hexdigest()
    tampered = BODY.replace(b"k1", b"k2")
    assert code_of(lambda: verify(CREDS, "POST", "/v2/proj123/records", "", lookup(headers), tampered, NOW)) == \
        ErrorCode.AUTH_BAD_SIGNATURE
    headers["X-Sdk-Content-Sha256"] = "UNSIGNED-PAYLOAD"   # not a signed header: not honoured
    assert code_of(lambda: verify(CREDS, "POST", "/v2/proj123/records", "", lookup(headers), tampered, NOW)) == \
        ErrorCode.AUTH_BAD_SIGNATURE


def test_a_signed_unsigned_payload_marker_is_honoured() -> None:
    """What the SDK does for non-JSON bodies: the marker is a signed header, the payload part is it."""
    headers = {**HEADERS, "X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"}
    names = sorted(k.lower() for k in headers)
    text = canonical_request("POST", "/v2/proj123/records", "", names, lookup(headers), "UNSIGNED-PAYLOAD")
    from broker.auth.signing import signature
    sig = signature("SKEXAMPLE", string_to_sign(DATE, text))
    headers["Authorization"] = f"SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders={';'.join(names)}, Signature={sig}"
    verify(CREDS, "POST", "/v2/proj123/records", "", lookup(headers), BODY, NOW)


_JUNK = st.one_of(st.none(), st.text(max_size=300), st.sampled_from([
    f"SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders={SIGNED}, Signature={'a' * 64}",
    f"SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders=host;x-sdk-date;\udcff, Signature={'a' * 64}",
    "SDK-HMAC-SHA256 Access=AKEXAMPLE, SignedHeaders=host;x-sdk-date, Signature=" + "f" * 64]))


@settings(max_examples=300, deadline=None)
@given(auth=_JUNK, date=st.one_of(st.none(), st.text(max_size=40), st.just(DATE)),
       others=st.dictionaries(st.sampled_from(["host", "content-type", "user-agent", "x-project-id",
                                               "x-sdk-content-sha256"]), st.text(max_size=200)),
       path=st.text(max_size=200), query=st.text(max_size=200), body=st.binary(max_size=200))
def test_junk_raises_only_catalogue_errors(auth: str | None, date: str | None, others: dict[str, str], path: str,
                                           query: str, body: bytes) -> None:
    headers = dict(others)
    if auth is not None:
        headers["authorization"] = auth
    if date is not None:
        headers["x-sdk-date"] = date
    try:
        verify(CREDS, "POST", path, query, lookup(headers), body, NOW)
    except BrokerError as exc:
        assert exc.code.http_status == 401
    else:
        pytest.fail("junk verified")
