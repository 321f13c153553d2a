"""Device classes, network profiles and measured latency profiles: what the planner reasons with.

Device classes and networks are TOML files shipped in ``devices/`` (package ``edgeexit.devices``), or any
TOML path with the same keys. TOML is data only: loading a profile never executes code. A device class is a
slowdown factor over a profile measured on this host; every use of it is labelled as emulation.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeexit.errors import ConfigError


@dataclass(frozen=True)
class DeviceClass:
    name: str
    slowdown: float
    description: str = ""
    source: str = ""

    @property
    def emulated(self) -> bool:
        return self.slowdown != 1.0


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    up_mbit: float
    down_mbit: float
    rtt_ms: float
    jitter_ms: float = 0.0
    source: str = ""


@dataclass
class LatencyProfile:
    """Measured per-segment latencies on one machine, one backend, one thread count.

    ``segment_ms[batch][k]`` is the median latency of segment k at that batch size; ``encode_ms[enc][s]`` and
    ``decode_ms[enc][s]`` are the wire codec's cost for one sample's boundary tensor at split point s.
    ``request_ms`` is the fixed cost of one request on this role outside segment compute (gRPC, tensor decode,
    input checks, response encode; on the device also the app's own loopback call to the agent): 0.0 in
    profiles made before it was measured.
    """

    backend: str
    threads: int
    segment_ms: dict[int, list[float]]
    segment_p90_ms: dict[int, list[float]] = field(default_factory=dict)
    encode_ms: dict[str, list[float]] = field(default_factory=dict)
    decode_ms: dict[str, list[float]] = field(default_factory=dict)
    host: str = ""
    slowdown: float = 1.0  # > 1: an emulated device class scaled from this host's measurement
    device_class: str = "host"
    request_ms: float = 0.0

    def per_sample_ms(self, batch: int = 1) -> list[float]:
        """Per-segment latency for one sample, from the closest measured batch size."""
        if not self.segment_ms:
            raise ConfigError("latency profile has no measurements; run `edgeexit profile BUNDLE`")
        b = min(self.segment_ms, key=lambda m: abs(m - batch))
        return [t / b for t in self.segment_ms[b]]

    def scaled(self, device: DeviceClass) -> LatencyProfile:
        """This measurement emulating a slower device class (labelled as such)."""
        f = device.slowdown

        def scale(d: dict) -> dict:
            return {key: [v * f for v in vals] for key, vals in d.items()}

        return LatencyProfile(self.backend, self.threads, scale(self.segment_ms), scale(self.segment_p90_ms),
                              scale(self.encode_ms), scale(self.decode_ms), self.host, self.slowdown * f, device.name,
                              self.request_ms * f)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyProfile:
        try:
            ints = lambda m: {int(k): [float(x) for x in v] for k, v in m.items()}  # noqa: E731  JSON keys are str
            return cls(
                backend=d["backend"], threads=int(d["threads"]), segment_ms=ints(d["segment_ms"]),
                segment_p90_ms=ints(d.get("segment_p90_ms", {})), encode_ms=d.get("encode_ms", {}),
                decode_ms=d.get("decode_ms", {}), host=d.get("host", ""), slowdown=float(d.get("slowdown", 1.0)),
                device_class=d.get("device_class", "host"), request_ms=float(d.get("request_ms", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"latency profile is malformed ({e!r}); re-create it with `edgeexit profile`") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"latency profile {p} not found; create it with `edgeexit profile BUNDLE --out {p}`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON ({e}); re-create it with `edgeexit profile`") from e


def _read_toml(kind: str, name_or_path: str) -> dict[str, Any]:
    p = Path(name_or_path)
    if p.suffix == ".toml":
        if not p.is_file():
            raise ConfigError(f"{kind} profile file {p} not found")
        text = p.read_text()
    else:
        res = resources.files("edgeexit.devices") / kind / f"{name_or_path}.toml"
        if not res.is_file():
            raise ConfigError(
                f"unknown {kind[:-1]} profile {name_or_path!r}; known: {', '.join(list_profiles(kind))} "
                "(or pass a path to a .toml file)"
            )
        text = res.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{kind[:-1]} profile {name_or_path!r} is not valid TOML: {e}") from e


def _build(cls: type, kind: str, name_or_path: str) -> Any:
    data = _read_toml(kind, name_or_path)
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(
            f"{kind[:-1]} profile {name_or_path!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}"
        )
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{kind[:-1]} profile {name_or_path!r}: {e}") from e


def load_device_class(name_or_path: str) -> DeviceClass:
    dev = _build(DeviceClass, "classes", name_or_path)
    if not dev.slowdown > 0:
        raise ConfigError(f"device class {dev.name!r}: slowdown must be positive")
    return dev


def load_network(name_or_path: str) -> NetworkProfile:
    net = _build(NetworkProfile, "networks", name_or_path)
    if net.up_mbit <= 0 or net.down_mbit <= 0 or net.rtt_ms < 0:
        raise ConfigError(f"network {net.name!r}: bandwidths must be positive and RTT non-negative")
    return net


def list_profiles(kind: str) -> list[str]:
    """Names of the shipped profiles of a kind ("classes" or "networks")."""
    folder = resources.files("edgeexit.devices") / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))
