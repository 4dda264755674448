"""The HTTP CONNECT parser and the session handle (broker.service._connect)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.service._connect import (
    MAX_HEAD,
    NEED_DATA,
    ConnectError,
    ConnectParser,
    ConnectRequest,
    handle_for_token,
    token_for_handle,
)

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.AbC-_dEf" * 8


def _parse(data: bytes, *, bytewise: bool = False) -> ConnectRequest:
    parser = ConnectParser()
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        event = parser.next_event()
        assert event is NEED_DATA
        parser.receive_data(chunk)
    event = parser.next_event()
    assert isinstance(event, ConnectRequest)
    return event


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_glib_connect_request(bytewise: bool) -> None:
    handle = handle_for_token(TOKEN)
    head = (
        f"CONNECT {handle}:5900 HTTP/1.0\r\nHost: {handle}:5900\r\n"
        "Proxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n"
    ).encode()
    request = _parse(head if bytewise else head + b"REDQ", bytewise=bytewise)
    assert request.host == handle and request.port == 5900
    assert request.rest == (b"" if bytewise else b"REDQ")
    assert token_for_handle(request.host) == TOKEN


def test_the_handle_survives_glib_lower_casing_and_has_dns_sized_labels() -> None:
    handle = handle_for_token(TOKEN)
    assert handle == handle.lower()
    assert all(0 < len(label) <= 63 for label in handle.split("."))
    assert token_for_handle(handle.upper()) == TOKEN
    with pytest.raises(ValueError):
        token_for_handle("not-a-handle!")
    with pytest.raises(ValueError):
        token_for_handle("")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT host:5900 HTTP/2\r\n\r\n", 505),
        (b"CONNECT host HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT host:0 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT host:99999 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT  host:1 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT h\xc3\xa9:1 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT host:1 HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"CONNECT host:1 HTTP/1.1\r\n" + b"A: b\r\n" * 40 + b"\r\n", 431),
    ],
)
def test_malformed_requests_are_refused_with_a_status(head: bytes, status: int) -> None:
    parser = ConnectParser()
    parser.receive_data(head)
    with pytest.raises(ConnectError) as refused:
        parser.next_event()
    assert refused.value.status == status


def test_the_head_is_bounded() -> None:
    parser = ConnectParser()
    parser.receive_data(b"CONNECT " + b"a" * MAX_HEAD)
    with pytest.raises(ConnectError) as refused:
        parser.next_event()
    assert refused.value.status == 431


def test_a_client_closing_early_is_an_error() -> None:
    parser = ConnectParser()
    parser.receive_data(b"CONNECT a:1 HTTP/1.1\r\n")
    assert parser.next_event() is NEED_DATA
    with pytest.raises(ConnectError):
        parser.receive_data(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_only_documented_errors(data: bytes, bytewise: bool) -> None:
    parser = ConnectParser()
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    try:
        for chunk in chunks:
            if not chunk:
                continue
            parser.receive_data(chunk)
            if parser.next_event() is not NEED_DATA:
                return
    except ConnectError as exc:
        assert exc.status in (400, 405, 431, 505)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
               min_size=1, max_size=600))
def test_handles_round_trip(token: str) -> None:
    assert token_for_handle(handle_for_token(token).lower()) == token
