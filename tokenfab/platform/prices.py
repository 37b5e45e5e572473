"""The price catalogue: what a device costs per hour and per joule, and how flags and a file override it."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_USD_PER_KWH = 0.12


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Price and power envelope of one device kind."""

    name: str
    usd_per_hour: float
    """Rental price; per core when per_core is set."""
    idle_watts: float
    """Draw when idle; per core when per_core is set."""
    peak_watts: float
    """Draw at full utilization; per core when per_core is set."""
    per_core: bool = False
    """CPUs are rented and powered by the core, GPUs by the device."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.name), "profile name must not be empty"),
            (self.usd_per_hour >= 0, f"profile {self.name!r}: usd_per_hour must be >= 0"),
            (self.idle_watts >= 0, f"profile {self.name!r}: idle_watts must be >= 0"),
            (self.peak_watts >= self.idle_watts, f"profile {self.name!r}: peak_watts must be >= idle_watts"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Typical public-cloud on-demand list prices and vendor TDPs, good enough to compare runs on one machine.
# They are not anyone's bill: override them (flags or a config file) for real accounting.
# "cpu" is one vCPU, about an AWS c7i vCPU ($0.0446/h); its watts are a per-core share of a server socket.
PROFILES: Mapping[str, DeviceProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            DeviceProfile("cpu", usd_per_hour=0.045, idle_watts=1.5, peak_watts=6.0, per_core=True),
            DeviceProfile("h100", usd_per_hour=2.50, idle_watts=70.0, peak_watts=700.0),
            DeviceProfile("h200", usd_per_hour=3.50, idle_watts=75.0, peak_watts=700.0),
            DeviceProfile("a100", usd_per_hour=1.50, idle_watts=50.0, peak_watts=400.0),
            DeviceProfile("l4", usd_per_hour=0.70, idle_watts=16.0, peak_watts=72.0),
        )
    }
)

_OVERRIDE_KEYS = ("usd_per_hour", "idle_watts", "peak_watts")
_FILE_KEYS = frozenset({"profile", "usd_per_kwh", "profiles", *_OVERRIDE_KEYS})
_PROFILE_KEYS = frozenset({"usd_per_hour", "idle_watts", "peak_watts", "per_core"})


@dataclass(frozen=True, slots=True)
class Prices:
    """What one engine's hardware costs: rent by the second plus energy by the joule."""

    device: DeviceProfile
    num_devices_or_cores: int
    """Cores for a per-core profile, devices otherwise."""
    usd_per_kwh: float = DEFAULT_USD_PER_KWH

    def __post_init__(self) -> None:
        if self.num_devices_or_cores < 1:
            raise ValueError("num_devices_or_cores must be >= 1")
        if self.usd_per_kwh < 0:
            raise ValueError("usd_per_kwh must be >= 0")

    @property
    def usd_per_second(self) -> float:
        return self.device.usd_per_hour * self.num_devices_or_cores / 3600.0

    def usd(self, seconds: float, joules: float) -> float:
        return seconds * self.usd_per_second + joules / 3.6e6 * self.usd_per_kwh


def load_prices(
    profile_name: str | None,
    device: str,
    num_cores: int,
    config_file: str | Path | None = None,
    usd_per_hour: float | None = None,
    usd_per_kwh: float | None = None,
    idle_watts: float | None = None,
    peak_watts: float | None = None,
) -> Prices:
    """Built-in profile, then the config file, then flags: each later source wins over the earlier."""
    file = _read_config(Path(config_file)) if config_file is not None else {}
    catalogue = {**PROFILES, **_file_profiles(file.get("profiles", {}))}
    name = profile_name or file.get("profile") or guess_profile_name(device)
    if name not in catalogue:
        raise ValueError(f"unknown price profile {name!r}; known: {', '.join(sorted(catalogue))}")
    flags = {"usd_per_hour": usd_per_hour, "idle_watts": idle_watts, "peak_watts": peak_watts}
    overrides = {k: file[k] for k in _OVERRIDE_KEYS if k in file}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    profile = dataclasses.replace(catalogue[name], **overrides)
    kwh = next(v for v in (usd_per_kwh, file.get("usd_per_kwh"), DEFAULT_USD_PER_KWH) if v is not None)
    return Prices(profile, num_cores if profile.per_core else 1, kwh)


def guess_profile_name(device: str) -> str:
    """cpu for the CPU; for CUDA the GPU's own name when it is one we price, else h100."""
    if device == "cpu":
        return "cpu"
    if not device.startswith("cuda"):
        raise ValueError(f"no default price profile for device {device!r}; name one explicitly")
    import torch  # only here: the CPU path must not pay for CUDA queries

    index = int(device.partition(":")[2] or 0)
    gpu = torch.cuda.get_device_name(index) if torch.cuda.is_available() else ""
    # Word boundaries keep "L40S" from reading as "L4".
    found = re.search(r"\b(H100|H200|A100|L4)\b", gpu)
    return found.group(1).lower() if found else "h100"


def _read_config(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        data = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"{path}: price config must be .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: price config must be a table of keys")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown price config keys {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}")
    for key in ("usd_per_kwh", *_OVERRIDE_KEYS):
        if key in data:
            _check_number(key, data[key])
    if "profile" in data and not isinstance(data["profile"], str):
        raise ValueError(f"{path}: 'profile' must be a string")
    return data


def _file_profiles(tables: Any) -> dict[str, DeviceProfile]:
    if not isinstance(tables, dict):
        raise ValueError("'profiles' must be a table of [profiles.<name>] tables")
    made = {}
    for name, fields in tables.items():
        if not isinstance(fields, dict):
            raise ValueError(f"profiles.{name} must be a table")
        unknown, missing = set(fields) - _PROFILE_KEYS, set(_OVERRIDE_KEYS) - set(fields)
        if unknown or missing:
            raise ValueError(f"profiles.{name}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        for key in _OVERRIDE_KEYS:
            _check_number(f"profiles.{name}.{key}", fields[key])
        if not isinstance(fields.get("per_core", False), bool):
            raise ValueError(f"profiles.{name}.per_core must be true or false")
        made[name] = DeviceProfile(name, **fields)
    return made


def _check_number(key: str, value: Any) -> None:
    # bool is an int subclass; `true` for a price is a typo, not 1 dollar.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
