"""The PROXY protocol v1 parser (broker.service._proxyprotocol): what nginx sends, every
malformed case the specification rules out, and a fuzz run."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.service._proxyprotocol import (
    MAX_LINE,
    NEED_DATA,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
)

#: What nginx 1.22's stream module sent ahead of its TLS handshake (proxy_protocol on,
#: proxy_ssl on), as a server on loopback received it.
NGINX = b"PROXY TCP4 127.0.0.2 127.0.0.1 49927 17001\r\n"
CLIENT_HELLO = b"\x16\x03\x01\x00\xb7\x01\x00\x00\xb3\x03\x03"


def _chunks(data: bytes, bytewise: bool) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))] if bytewise else [data]


def parse(data: bytes, *, bytewise: bool = False) -> ProxyHeader:
    """The header of *data*, fed whole or byte by byte (NEED_DATA until its line ends)."""
    parser = ProxyHeaderParser()
    assert parser.next_event() is NEED_DATA
    for chunk in _chunks(data, bytewise):
        parser.receive_data(chunk)
        event = parser.next_event()
        if isinstance(event, ProxyHeader):
            return event
    raise AssertionError("no header")


def refusal(data: bytes, *, bytewise: bool = False) -> str:
    """The detail of the error *data* is refused with (fed whole or byte by byte)."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError) as refused:
        for chunk in _chunks(data, bytewise):
            parser.receive_data(chunk)
            assert parser.next_event() is NEED_DATA
    return refused.value.detail


@pytest.mark.parametrize("bytewise", [False, True])
def test_what_nginx_sends_before_its_tls(bytewise: bool) -> None:
    data = NGINX + (b"" if bytewise else CLIENT_HELLO)
    header = parse(data, bytewise=bytewise)
    assert header == ProxyHeader("TCP4", "127.0.0.2", "127.0.0.1", 49927, 17001,
                                 b"" if bytewise else CLIENT_HELLO)
    assert header.client("10.0.2.11") == "127.0.0.2"


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n", "2001:db8::7", "2001:db8::1"),
        (b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0007 ::1 0 443\r\n",
         "2001:db8::7", "::1"),
        (b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.2.11 5 6\r\n",
         "::ffff:203.0.113.7", "::ffff:10.0.2.11"),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n", "0.0.0.0", "255.255.255.255"),
    ],
)
def test_tcp6_and_the_edges_of_tcp4(line: bytes, source: str, destination: str) -> None:
    header = parse(line + b"CONNECT")
    assert (header.source, header.destination, header.rest) == (source, destination, b"CONNECT")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN whatever the sender had \x01\xff\r\n",
        # the longest line the specification allows: 107 bytes
        b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
    ],
)
def test_unknown_means_the_peer_is_the_client(line: bytes) -> None:
    header = parse(line + b"rest")
    assert (header.family, header.source, header.source_port) == ("UNKNOWN", None, None)
    assert header.client("10.0.2.11") == "10.0.2.11" and header.rest == b"rest"
    assert len(line) <= MAX_LINE


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        # what is no PROXY v1 header at all, refused from its first bytes
        (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12), "PROXY v2 not supported"),
        (CLIENT_HELLO, "no PROXY header: the connection starts with a TLS handshake"),
        (b"CONNECT handle:443 HTTP/1.1\r\n\r\n", "the connection starts with 'C"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
        (b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
        (b"\x00\x01", "the connection starts with binary data"),
        # the line's end
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "must end with CRLF, not a lone LF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "a CR without LF"),
        (b"PROXY UNKNOWN " + b"x" * 200, f"too long: no CRLF in {MAX_LINE} bytes"),
        (b"PROXY UNKNOWN " + b"x" * (MAX_LINE - 15) + b"\r\n", "too long"),  # 108 bytes
        # the family
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY protocol family 'TCP5'"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY protocol family 'UDP4'"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY protocol family"),
        (b"PROXY \r\n", "unknown PROXY protocol family ''"),
        (b"PROXY UNKNOWNX\r\n", "unknown PROXY protocol family 'UNKNOWNX'"),
        # the fields: exactly four, one space apart
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs exactly"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs exactly"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs exactly"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs exactly"),
        (b"PROXY TCP4\r\n", "needs exactly"),
        # addresses
        (b"PROXY TCP4 203.0.113.256 5.6.7.8 1 2\r\n", "'203.0.113.256' is not an IP address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "'01.2.3.4' is not an IP address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "'1.2.3' is not an IP address"),
        (b"PROXY TCP4 client.example 5.6.7.8 1 2\r\n", "is not an IP address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "'fe80::1%eth0' is not an IP address"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "is not an IP address"),
        (b"PROXY TCP4 \xc3\xa9.2.3.4 5.6.7.8 1 2\r\n", "is not an IP address"),
        (b"PROXY TCP4 2001:db8::7 5.6.7.8 1 2\r\n",
         "address family mismatch: TCP4 with an IPv6 address (2001:db8::7)"),
        (b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n",
         "address family mismatch: TCP6 with an IPv4 address (203.0.113.7)"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "address family mismatch"),
        # ports
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "'65536' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "'080' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "'-1' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 http\r\n", "'http' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "'+2' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", "is not a port"),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_malformed_headers_are_refused(data: bytes, detail: str, bytewise: bool) -> None:
    assert detail in refusal(data, bytewise=bytewise)


def test_a_v2_signature_is_waited_for_whole_and_anything_else_refused_at_once() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(V2_SIGNATURE[:11])
    assert parser.next_event() is NEED_DATA  # could still be the signature
    parser.receive_data(V2_SIGNATURE[11:])
    with pytest.raises(ProxyHeaderError, match="PROXY v2 not supported"):
        parser.next_event()
    for first in (b"G", b"\x16", b"\r\n\r\n\x01", b"PROXY:"):
        parser = ProxyHeaderParser()
        parser.receive_data(first)
        with pytest.raises(ProxyHeaderError, match="no PROXY header"):
            parser.next_event()


def test_the_parser_holds_at_most_a_line() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(b"PROXY UNKNOWN " + b"a" * (MAX_LINE - 14 - 1))
    assert parser.next_event() is NEED_DATA  # 106 bytes: the CRLF may still come
    parser.receive_data(b"a")
    with pytest.raises(ProxyHeaderError, match="too long"):
        parser.next_event()


def test_a_peer_closing_early_and_misuse() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(b"PROXY TCP4 1.2.3.4")
    assert parser.next_event() is NEED_DATA
    with pytest.raises(ProxyHeaderError, match="closed before its PROXY header"):
        parser.receive_data(b"")
    parser = ProxyHeaderParser()
    parser.receive_data(NGINX)
    assert isinstance(parser.next_event(), ProxyHeader)
    with pytest.raises(RuntimeError):
        parser.next_event()
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")


@settings(max_examples=300, deadline=None)
@given(
    st.ip_addresses(), st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535),
    st.binary(max_size=64), st.booleans(),
)
def test_any_valid_header_round_trips(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address,
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address,
    source_port: int, destination_port: int, rest: bytes, bytewise: bool,
) -> None:
    if source.version != destination.version:
        destination = ipaddress.ip_address("::1" if source.version == 6 else "127.0.0.1")
    family = f"TCP{source.version}"
    line = f"PROXY {family} {source.exploded if bytewise else source} {destination} "
    line += f"{source_port} {destination_port}\r\n"
    header = parse(line.encode() + rest if not bytewise else line.encode(), bytewise=bytewise)
    assert ipaddress.ip_address(header.client("peer")) == source
    assert ipaddress.ip_address(header.destination or "") == destination
    assert (header.family, header.source_port, header.destination_port) == (
        family, source_port, destination_port)
    assert header.rest == (b"" if bytewise else rest)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
                 st.binary(max_size=120).map(lambda tail: b"PROXY TCP4 " + tail),
                 st.binary(max_size=120).map(lambda tail: b"PROXY TCP6 " + tail)),
       st.booleans())
def test_fuzz_only_documented_errors(data: bytes, bytewise: bool) -> None:
    """Whole or byte by byte: a header, NEED_DATA, or ProxyHeaderError; never more than a
    line held."""
    parser = ProxyHeaderParser()
    try:
        for chunk in _chunks(data, bytewise):
            if not chunk:
                continue
            parser.receive_data(chunk)
            event = parser.next_event()
            if isinstance(event, ProxyHeader):
                assert data.index(b"\r\n") + 2 <= MAX_LINE
                return
            assert len(parser._buffer) < MAX_LINE  # waiting: less than a line held
    except ProxyHeaderError:
        pass
