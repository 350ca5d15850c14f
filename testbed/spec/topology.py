"""Topology files: ordered tiers of heterogeneous nodes joined by links.

name: three-tier
tiers:                       # ordered: first = closest to the user (edge)
  - name: edge
    lan: {bandwidth: 1Gbit, delay: 0.2ms}
    nodes:
      - {name: edge-1, device: jetson-orin-nano}
      - {name: edge-2, device: {base: jetson-orin-nano, mem: 4GiB}}
      - {name: edge-x, device: raspberry-pi-5, count: 2}      # edge-x-1, edge-x-2
  - name: fog ...
links:                       # between consecutive tiers
  - {from: edge, to: fog, bandwidth: 100Mbit, delay: 10ms, jitter: 2ms, loss: 0.1%}
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from testbed.errors import ConfigError, brief
from testbed.spec.batching import check_max_batch
from testbed.spec.devices import DeviceProfile, resolve_device
from testbed.spec.loading import read_mapping, validate
from testbed.spec.quantities import LinkSeconds, Percent, RateBps

_NAME = r"^[a-z0-9][a-z0-9_.-]{0,40}$"
MAX_NODES = 10_000  # in one topology, after ``count`` is expanded
MAX_TIERS = 64


class LinkSpec(BaseModel):
    """A shaped link (one direction's parameters; both directions get the same)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    bandwidth_bps: RateBps = Field(alias="bandwidth", gt=0)
    delay_s: LinkSeconds = Field(default=0.0, alias="delay")  # one-way
    jitter_s: LinkSeconds = Field(default=0.0, alias="jitter")  # uniform in delay +- jitter
    loss_pct: Percent = Field(default=0.0, alias="loss")  # per packet, percent

    @model_validator(mode="after")
    def _jitter_le_delay(self) -> LinkSpec:
        if self.jitter_s > self.delay_s:
            raise ValueError(
                f"jitter ({self.jitter_s * 1e3:g}ms) is larger than delay ({self.delay_s * 1e3:g}ms); "
                "jitter is drawn in delay +- jitter, so make jitter <= delay"
            )
        return self


class InterTierLink(LinkSpec):
    src: str = Field(alias="from")  # tier name
    dst: str = Field(alias="to")  # tier name


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    device: DeviceProfile
    # runtime swarm: the swarm node to run on (its hostname, its `testbed.host` label, or a
    # `key=value` node label); None: the engine places it
    host: str | None = Field(default=None, min_length=1, max_length=255)
    # GPU nodes: which GPUs of its host it gets (a list of indices) or how many (a count);
    # None: every GPU of the host (docker) / one GPU (swarm)
    gpus: tuple[int, ...] | int | None = None
    # continuous batching: most requests one step of its stage server runs together (None:
    # the scenario's max_batch, else the server's default; precedence in spec/batching.py)
    max_batch: int | None = None

    _max_batch = field_validator("max_batch", mode="before")(lambda cls, v: check_max_batch(v))

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"gpus: a count must be >= 1, got {v}; or list indices, e.g. [0]")
        if isinstance(v, tuple) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"gpus: {list(v)} must be distinct GPU indices >= 0, e.g. [0, 1]")
        return v

    @field_validator("device", mode="before")
    @classmethod
    def _resolve(cls, v: Any) -> Any:
        return resolve_device(v)


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    nodes: tuple[Node, ...] = Field(min_length=1)
    lan: LinkSpec = LinkSpec.model_validate(
        {"bandwidth": "10Gbit", "delay": "0.1ms"}
    )  # inside the tier

    @field_validator("nodes", mode="before")
    @classmethod
    def _expand_count(cls, v: Any) -> Any:
        """``count: k`` on a node entry makes k nodes named NAME-1..NAME-k."""
        if not isinstance(v, list):
            return v
        _node_count([(f"nodes[{k}]", e) for k, e in enumerate(v)])  # before any node is made
        out: list[Any] = []
        for entry in v:
            if isinstance(entry, dict) and "count" in entry:
                count = entry["count"]
                base = {k: x for k, x in entry.items() if k != "count"}
                for i in range(1, count + 1):
                    out.append({**base, "name": f"{base.get('name', 'node')}-{i}"})
            else:
                out.append(entry)
        return out


def _node_count(entries: list[tuple[str, Any]], total: int = 0) -> int:
    """Nodes the ``(path, entry)`` pairs make (``count`` included) on top of ``total``,
    refused above :data:`MAX_NODES` before any node is made; a bad count is left to the tier."""
    for path, entry in entries:
        count = entry.get("count", 1) if isinstance(entry, dict) else 1
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{path}.count: must be a whole number >= 1, got {brief(count)}")
        total += count
        if total > MAX_NODES:
            raise ValueError(
                f"{path}.count: {brief(count)} makes the topology more than {MAX_NODES:,} nodes, "
                f"the limit; lower count"
            )
    return total


def _repeated(names: list[str]) -> str:
    dup = sorted(n for n, k in Counter(names).items() if k > 1)
    return ", ".join(dup[:10]) + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    description: str = ""
    tiers: tuple[Tier, ...] = Field(min_length=1, max_length=MAX_TIERS)
    links: tuple[InterTierLink, ...] = Field(default=(), max_length=MAX_TIERS)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        """Count the nodes of every tier before any is built (``count: 100000000``)."""
        tiers = data.get("tiers") if isinstance(data, dict) else None
        if isinstance(tiers, list) and len(tiers) <= MAX_TIERS:
            _node_count(
                [
                    (f"tiers[{j}].nodes[{k}]", e)
                    for j, t in enumerate(tiers)
                    if isinstance(t, dict) and isinstance(t.get("nodes"), list)
                    for k, e in enumerate(t["nodes"])
                ]
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> Topology:
        tier_names = [t.name for t in self.tiers]
        dup = _repeated(tier_names)
        if dup:
            raise ValueError(f"tier names must be unique; repeated: {dup}")
        dup = _repeated([n.name for t in self.tiers for n in t.nodes])
        if dup:
            raise ValueError(f"node names must be unique across tiers; repeated: {dup}")
        index = {n: i for i, n in enumerate(tier_names)}
        seen: set[tuple[int, int]] = set()
        for k, link in enumerate(self.links):
            for end in (link.src, link.dst):
                if end not in index:
                    import difflib

                    close = difflib.get_close_matches(end, tier_names, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(
                        f"links[{k}]: tier {end!r} does not exist; {hint}tiers are: {', '.join(tier_names)}"
                    )
            a, b = index[link.src], index[link.dst]
            if abs(a - b) != 1:
                raise ValueError(
                    f"links[{k}]: {link.src} -> {link.dst} does not join consecutive tiers; "
                    f"links go between neighbours in the order {' -> '.join(tier_names)}"
                )
            key = (min(a, b), max(a, b))
            if key in seen:
                raise ValueError(
                    f"links[{k}]: {link.src} <-> {link.dst} is defined twice; keep one"
                )
            seen.add(key)
        missing = [
            f"{tier_names[j]} -> {tier_names[j + 1]}"
            for j in range(len(tier_names) - 1)
            if (j, j + 1) not in seen
        ]
        if missing:
            raise ValueError(
                f"no link between consecutive tiers {', '.join(missing)}; add e.g. "
                f"{{from: {tier_names[0]}, to: {tier_names[1] if len(tier_names) > 1 else '?'}, bandwidth: 100Mbit, delay: 10ms}}"
            )
        return self

    # -- queries -----------------------------------------------------------------------------
    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tier_index(self, name: str) -> int:
        return self.tier_names.index(name)

    def uplink(self, j: int) -> LinkSpec | None:
        """The link from tier j to tier j+1 (None for the last tier)."""
        if j >= len(self.tiers) - 1:
            return None
        a, b = self.tiers[j].name, self.tiers[j + 1].name
        for link in self.links:
            if {link.src, link.dst} == {a, b}:
                return link
        return None  # unreachable after validation

    def nodes(self) -> list[tuple[int, Node]]:
        return [(j, n) for j, t in enumerate(self.tiers) for n in t.nodes]

    def node(self, name: str) -> tuple[int, Node]:
        for j, n in self.nodes():
            if n.name == name:
                return j, n
        raise KeyError(name)


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file; errors name the file, field and fix (exit 2)."""
    data = read_mapping(path, "topology")
    return validate(Topology, data, str(path))


def topology_from_dict(data: dict[str, Any], source: str = "<topology>") -> Topology:
    """A topology built in Python: quantities may be numbers in their base unit (bits/s,
    seconds, bytes); every other check is the file's."""
    if not isinstance(data, dict):
        raise ConfigError("a topology must be a mapping", source=source)
    return validate(Topology, data, source, from_file=False)
