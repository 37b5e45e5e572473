"""Power meters: cumulative joules from NVML, RAPL, or a utilization model, behind one interface.

Callers read `energy_joules()` before and after an engine step and take the difference; `source` says
whether that number was measured by the hardware or modelled, so reports never pass one off as the other.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from tokenfab.platform.prices import DeviceProfile

EnergySource = Literal["measured", "modelled"]
DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"

# Top-level package zones only: subzones (intel-rapl:0:0 core, uncore, dram) are either inside the package
# figure already or measured separately, and summing them would count energy twice.
_PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:\d+$")


class PowerMeter(ABC):
    """Cumulative energy since the meter was created; never decreases."""

    name: str
    source: EnergySource

    @abstractmethod
    def energy_joules(self) -> float: ...


class RaplMeter(PowerMeter):
    """CPU package energy from the powercap sysfs tree, summed over sockets.

    RAPL counts the whole package, so other processes on the same sockets are billed too. The counters wrap
    (a 32-bit register, minutes at full load), so the meter must be read at least once per wrap period;
    one read per engine step is far more often than that.
    """

    source: EnergySource = "measured"

    def __init__(self, root: str | Path = DEFAULT_POWERCAP_ROOT) -> None:
        self.name = "rapl"
        self._zones = _package_zones(Path(root))
        if not self._zones:
            raise OSError(f"no readable RAPL package zone under {root}")
        self._ranges = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = [_read_uj(z) for z in self._zones]
        self._total_uj = 0

    @classmethod
    def available(cls, root: str | Path = DEFAULT_POWERCAP_ROOT) -> bool:
        return bool(_package_zones(Path(root)))

    def energy_joules(self) -> float:
        now = [_read_uj(z) for z in self._zones]
        for last, current, wrap in zip(self._last, now, self._ranges):
            delta = current - last
            self._total_uj += delta if delta >= 0 else delta + wrap
        self._last = now
        return self._total_uj / 1e6


def _package_zones(root: Path) -> list[Path]:
    """Package zones whose counter this process may read (root-only on kernels patched for PLATYPUS)."""
    if not root.is_dir():
        return []
    zones = []
    for zone in sorted(root.iterdir()):
        # psys covers the whole platform, packages included; adding it would double-count.
        if _PACKAGE_ZONE.match(zone.name) and _zone_name(zone) != "psys":
            try:
                _read_uj(zone)
                int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append(zone)
    return zones


def _zone_name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""


def _read_uj(zone: Path) -> int:
    return int((zone / "energy_uj").read_text())


class NvmlMeter(PowerMeter):
    """GPU board energy from NVML's total-energy counter (Volta and newer).

    `device_index` is NVML's index, which matches CUDA's only when CUDA_VISIBLE_DEVICES is unset and
    CUDA_DEVICE_ORDER=PCI_BUS_ID (or the GPUs are all alike).
    """

    source: EnergySource = "measured"

    def __init__(self, device_index: int = 0) -> None:
        import pynvml  # optional dependency (nvidia-ml-py); absent on CPU-only machines

        pynvml.nvmlInit()
        self.name = f"nvml:{device_index}"
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    @classmethod
    def available(cls, device_index: int = 0) -> bool:
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return False
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(device_index))
            return True
        except pynvml.NVMLError:
            return False
        finally:
            pynvml.nvmlShutdown()

    def energy_joules(self) -> float:
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0


class ModelledMeter(PowerMeter):
    """Energy estimated as idle + (peak - idle) x utilization, integrated between readings.

    Utilization is this process's CPU time over the wall time of `num_cores` cores. For a GPU profile that
    is a crude proxy (a host thread driving the GPU reads as one busy core), which is why `source` says
    "modelled". Readings are exact only as far as the gap between them is uniformly loaded, so read often.
    """

    source: EnergySource = "modelled"

    def __init__(
        self,
        profile: DeviceProfile,
        num_cores: int,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        if num_cores < 1:
            raise ValueError("num_cores must be >= 1")
        self.name = f"model:{profile.name}"
        self._profile, self._num_cores = profile, num_cores
        self._clock, self._cpu_clock = clock, cpu_clock
        self._last_wall, self._last_cpu = clock(), cpu_clock()
        self._joules = 0.0

    def energy_joules(self) -> float:
        wall, cpu = self._clock(), self._cpu_clock()
        seconds = wall - self._last_wall
        if seconds > 0:
            utilization = min(1.0, max(0.0, (cpu - self._last_cpu) / (seconds * self._num_cores)))
            self._joules += self._watts(utilization) * seconds
        self._last_wall, self._last_cpu = wall, cpu
        return self._joules

    def _watts(self, utilization: float) -> float:
        p = self._profile
        scale = self._num_cores if p.per_core else 1
        return (p.idle_watts + (p.peak_watts - p.idle_watts) * utilization) * scale


def select_meter(
    device: str, profile: DeviceProfile, num_cores: int, powercap_root: str | Path = DEFAULT_POWERCAP_ROOT
) -> PowerMeter:
    """The best meter this machine offers for `device`: hardware counters when readable, else the model."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if NvmlMeter.available(index):
            return NvmlMeter(index)
    elif device == "cpu" and RaplMeter.available(powercap_root):
        return RaplMeter(powercap_root)
    return ModelledMeter(profile, num_cores)
