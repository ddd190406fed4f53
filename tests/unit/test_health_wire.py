"""l4lb.healthwire: the probe and reply round-trip, every malformed datagram is refused with its
reason, and the probe's inner packet is a valid IPv4/UDP datagram (checked by scapy)."""

from __future__ import annotations

import pytest

from l4lb.errors import ConfigError
from l4lb.healthcfg import HealthConfig
from l4lb.healthwire import (
    DETAIL_MAX,
    PROBE,
    REPLY,
    BadMessage,
    Kind,
    Probe,
    Reply,
    Verdict,
    WireError,
    decode_probe,
    decode_reply,
    encode_probe,
    encode_reply,
    udp_datagram,
)

BACKEND = bytes([10, 2, 3, 2])


def reply(**kw: object) -> Reply:
    base: dict[str, object] = dict(
        kind=Kind.REPLY, token=0xDEADBEEF, seq=7, backend=BACKEND, verdict=Verdict.DOWN,
        suppressed=True, instance=0x1234, age_ms=1500, check_failures=3,
        detail="connect: connection refused",
    )  # fmt: skip
    base.update(kw)
    return Reply(**base)  # type: ignore[arg-type]


def test_probe_and_reply_round_trip() -> None:
    p = Probe(token=1, seq=2**32 - 1, backend=BACKEND)
    data = encode_probe(p)
    assert len(data) == PROBE.size == 20 and decode_probe(data) == p
    for r in (reply(), reply(kind=Kind.PUSH, verdict=Verdict.UP, suppressed=False, detail="")):
        assert decode_reply(encode_reply(r)) == r


def test_long_detail_is_cut_on_a_character_boundary() -> None:
    r = decode_reply(encode_reply(reply(detail="é" * 100)))
    assert r.detail == "é" * (DETAIL_MAX // 2)


def bad(data: bytes) -> BadMessage:
    with pytest.raises(WireError) as exc:
        decode_reply(data)
    return exc.value.reason


def test_every_malformed_reply_names_its_reason() -> None:
    good = encode_reply(reply(detail="ok"))
    assert bad(good[:10]) == BadMessage.SHORT
    assert bad(b"XXXX" + good[4:]) == BadMessage.BAD_MAGIC
    assert bad(good[:4] + b"\x09" + good[5:]) == BadMessage.BAD_VERSION
    assert bad(encode_probe(Probe(1, 2, BACKEND)) + bytes(16)) == BadMessage.BAD_KIND
    assert bad(good + b"x") == BadMessage.BAD_LENGTH
    assert bad(good[:-1]) == BadMessage.BAD_LENGTH
    verdict_at = 20
    assert bad(good[:verdict_at] + b"\x07" + good[verdict_at + 1 :]) == BadMessage.BAD_VERDICT
    broken = good[: REPLY.size] + b"\xff\xfe"
    broken = broken[:22] + bytes([2]) + broken[23:]  # detail length 2, not UTF-8
    assert bad(broken) == BadMessage.BAD_DETAIL


def test_malformed_probes_are_refused() -> None:
    good = encode_probe(Probe(1, 2, BACKEND))
    for data, reason in (
        (good[:19], BadMessage.SHORT),
        (good + b"\x00", BadMessage.BAD_LENGTH),
        (encode_reply(reply()), BadMessage.BAD_KIND),
        (b"L4HX" + good[4:], BadMessage.BAD_MAGIC),
    ):
        with pytest.raises(WireError) as exc:
            decode_probe(data)
        assert exc.value.reason == reason


def test_inner_packet_is_valid_ipv4_udp() -> None:
    scapy = pytest.importorskip("scapy.all")
    payload = encode_probe(Probe(5, 6, BACKEND))
    pkt = udp_datagram(bytes([10, 1, 1, 2]), bytes([20, 0, 0, 1]), 40000, 9181, payload)
    ip = scapy.IP(pkt)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.flags.DF) == ("10.1.1.2", "20.0.0.1", 17, 64, 1)
    assert (ip[scapy.UDP].sport, ip[scapy.UDP].dport, bytes(ip[scapy.UDP].payload)) == (
        40000, 9181, payload,
    )  # fmt: skip
    rebuilt = scapy.IP(bytes(pkt))
    del rebuilt.chksum
    del rebuilt[scapy.UDP].chksum
    rebuilt = scapy.IP(bytes(rebuilt))
    assert rebuilt.chksum == ip.chksum and rebuilt[scapy.UDP].chksum == ip[scapy.UDP].chksum


def test_health_config_refuses_bad_values_naming_the_field() -> None:
    HealthConfig()  # the defaults hold
    for kwargs, field in (
        ({"interval": 0}, "interval"),
        ({"fast_interval": 1.0}, "fast_interval"),
        ({"timeout": 0.6}, "timeout"),
        ({"fall": 0}, "fall"),
        ({"rise": True}, "rise"),
        ({"port": 70000}, "port"),
        ({"path": "health"}, "path"),
        ({"path": "/a b"}, "path"),
        ({"reuse": 3.0}, "reuse"),
        ({"max_suppress": -1.0}, "max_suppress"),
    ):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            HealthConfig(**kwargs)
    assert HealthConfig(path="/health").request().startswith(b"GET /health HTTP/1.0\r\n")
    assert HealthConfig().request() == b"HEAD / HTTP/1.0\r\n\r\n"
