"""l4lb.cfgfile: a dataclass to JSON and back, every value checked, errors naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.config import AgentConfig
from fastpath.config import LbConfig
from l4lb import cfgfile
from l4lb.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    n: int
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    pairs: tuple[tuple[str, int | None], ...]
    inner: Inner
    extra: dict[str, int] = field(default_factory=dict)
    flag: bool = False
    maybe: str | None = None

    def __post_init__(self) -> None:
        if self.inner.n < 0:
            raise ConfigError(f"inner.n: must be >= 0, not {self.inner.n}")


GOOD = {"name": "x", "pairs": [["a", 1], ["b", None]], "inner": {"n": 2, "ratio": 1}}


def test_round_trip_and_json_types_become_the_annotations():
    got = cfgfile.from_dict(Outer, GOOD)
    assert got == Outer("x", (("a", 1), ("b", None)), Inner(2, 1.0))
    assert isinstance(got.inner.ratio, float)
    assert cfgfile.from_dict(Outer, json.loads(cfgfile.dump(got))) == got


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": 3}, "where: name: must be a string, not 3"),
        ({"pairs": [["a"]]}, r"where: pairs\[0\]: must be a list of 2, not 1"),
        ({"pairs": [["a", "1"]]}, r"where: pairs\[0\]\[1\]: '1' is not int \| None"),
        ({"inner": {"n": True}}, "where: inner: n: must be an integer, not True"),
        ({"inner": {"n": -1}}, "where: inner.n: must be >= 0, not -1"),
        ({"flag": 1}, "where: flag: must be true or false, not 1"),
        ({"extra": {"k": "v"}}, "where: extra.k: must be an integer"),
        ({"oops": 1}, "where: unknown key.s. 'oops'"),
    ],
)
def test_a_bad_value_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        cfgfile.from_dict(Outer, {**GOOD, **change}, "where")


def test_missing_required_key_and_not_an_object():
    with pytest.raises(ConfigError, match="where: missing key 'inner'"):
        cfgfile.from_dict(Outer, {"name": "x", "pairs": []}, "where")
    with pytest.raises(ConfigError, match="where: must be a JSON object, not list"):
        cfgfile.from_dict(Outer, [], "where")


def test_the_process_configurations_load_from_their_files(tmp_path: Path):
    lb = LbConfig(iface="h1-eth0", vips=(("20.0.0.1", 80),), backends=(("10.2.3.2", 1),))
    agent = AgentConfig(vips=("20.0.0.1",), allowed_lbs=("10.1.1.2",), iface="h3-eth0")
    for cfg in (lb, agent):
        path = tmp_path / "c.json"
        path.write_text(cfgfile.dump(cfg))
        assert cfgfile.load(type(cfg), path) == cfg
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not JSON"):
        cfgfile.load(LbConfig, path)
