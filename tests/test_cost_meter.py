"""Power meters, the price catalogue and per-request cost attribution, with exact expected numbers."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from tokenfab.economics.attribution import CostMeter, RequestCost, StepCost, split_step
from tokenfab.platform.power import ModelledMeter, NvmlMeter, PowerMeter, RaplMeter, select_meter
from tokenfab.platform.prices import PROFILES, DeviceProfile, Prices, guess_profile_name, load_prices


def zone(root: Path, name: str, energy_uj: int, max_uj: int = 10_000_000, label: str = "package") -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "name").write_text(f"{label}\n")
    return path


def set_uj(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


def ticks(*values: float):
    return iter(values).__next__


# --- RAPL ---------------------------------------------------------------------------------------------


def test_rapl_sums_packages_ignores_subzones_and_psys(tmp_path):
    (tmp_path / "intel-rapl").mkdir()  # the control-type directory has no counter
    p0 = zone(tmp_path, "intel-rapl:0", 1_000_000)
    p1 = zone(tmp_path, "intel-rapl:1", 2_000_000)
    core = zone(tmp_path, "intel-rapl:0:0", 5_000, label="core")
    psys = zone(tmp_path, "intel-rapl:2", 0, label="psys")
    meter = RaplMeter(tmp_path)
    assert (meter.name, meter.source) == ("rapl", "measured")
    assert meter.energy_joules() == 0.0
    set_uj(p0, 3_000_000)
    set_uj(p1, 2_500_000)
    set_uj(core, 9_000_000)
    set_uj(psys, 9_000_000)
    assert meter.energy_joules() == 2.5
    assert meter.energy_joules() == 2.5


def test_rapl_handles_wraparound(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", 9_000_000, max_uj=10_000_000)
    meter = RaplMeter(tmp_path)
    set_uj(p0, 500_000)  # wrapped: 1.0 J to the top, then 0.5 J
    assert meter.energy_joules() == 1.5
    set_uj(p0, 1_500_000)
    assert meter.energy_joules() == 2.5


def test_rapl_accepts_amd_zone_names(tmp_path):
    p0 = zone(tmp_path, "amd-rapl:0", 100)
    meter = RaplMeter(tmp_path)
    set_uj(p0, 250_100)
    assert meter.energy_joules() == 0.25


def test_rapl_unavailable_without_a_readable_package_zone(tmp_path):
    assert not RaplMeter.available(tmp_path / "missing")
    assert not RaplMeter.available(tmp_path)
    zone(tmp_path, "intel-rapl:0:0", 1, label="core")
    (zone(tmp_path, "intel-rapl:0", 1) / "energy_uj").unlink()
    assert not RaplMeter.available(tmp_path)
    with pytest.raises(OSError, match="no readable RAPL"):
        RaplMeter(tmp_path)
    zone(tmp_path, "intel-rapl:0", 1)
    assert RaplMeter.available(tmp_path)


# --- modelled meter -----------------------------------------------------------------------------------


def test_modelled_cpu_meter_integrates_utilization_exactly():
    meter = ModelledMeter(
        PROFILES["cpu"], num_cores=2, clock=ticks(0.0, 2.0, 3.0, 3.0), cpu_clock=ticks(0.0, 1.0, 6.0, 7.0)
    )
    assert (meter.name, meter.source) == ("model:cpu", "modelled")
    # 1 cpu-second over 2 s on 2 cores: utilization 0.25 -> (1.5 + 4.5 * 0.25) W/core * 2 cores * 2 s
    assert meter.energy_joules() == 10.5
    # 5 cpu-seconds in 1 s on 2 cores clamps to 1.0 -> 6 W/core * 2 cores * 1 s
    assert meter.energy_joules() == 22.5
    # no wall time passed: nothing added
    assert meter.energy_joules() == 22.5


def test_modelled_gpu_meter_is_not_scaled_by_cores():
    meter = ModelledMeter(PROFILES["h100"], num_cores=2, clock=ticks(10.0, 11.0), cpu_clock=ticks(0.0, 0.5))
    # utilization 0.5 cpu-s / (1 s * 2 cores) = 0.25; a device profile's watts are the whole device's
    assert meter.energy_joules() == 70.0 + 630.0 * 0.25


# --- NVML (through a fake pynvml: no GPU here) ---------------------------------------------------------


def fake_pynvml(energy_mj: list[int], init_fails: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if init_fails:
            raise NVMLError("driver not loaded")

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    mod.nvmlDeviceGetTotalEnergyConsumption = lambda handle: energy_mj.pop(0)
    return mod


def test_nvml_unavailable_without_pynvml_or_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert NvmlMeter.available() is False
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_fails=True))
    assert NvmlMeter.available() is False


def test_select_meter_picks_nvml_for_cuda_when_it_reads(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([5_000, 7_000, 9_500]))
    meter = select_meter("cuda:1", PROFILES["h100"], num_cores=1)
    assert isinstance(meter, NvmlMeter)
    assert (meter.name, meter.source) == ("nvml:1", "measured")
    assert meter.energy_joules() == 2.5


def test_select_meter_falls_back_to_the_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    gpu = select_meter("cuda", PROFILES["h100"], num_cores=1, powercap_root=tmp_path)
    cpu = select_meter("cpu", PROFILES["cpu"], num_cores=4, powercap_root=tmp_path / "none")
    assert (type(gpu), gpu.name, gpu.source) == (ModelledMeter, "model:h100", "modelled")
    assert (type(cpu), cpu.name, cpu.source) == (ModelledMeter, "model:cpu", "modelled")


def test_select_meter_uses_rapl_for_cpu_when_readable(tmp_path):
    zone(tmp_path, "intel-rapl:0", 1)
    meter = select_meter("cpu", PROFILES["cpu"], num_cores=4, powercap_root=tmp_path)
    assert (type(meter), meter.source) == (RaplMeter, "measured")


# --- prices -------------------------------------------------------------------------------------------


def test_builtin_catalogue_is_immutable_and_cpu_is_per_core():
    with pytest.raises(TypeError):
        PROFILES["cpu"] = PROFILES["h100"]  # type: ignore[index]
    assert PROFILES["cpu"] == DeviceProfile("cpu", 0.045, 1.5, 6.0, per_core=True)
    assert PROFILES["l4"] == DeviceProfile("l4", 0.70, 16.0, 72.0)


def test_default_cpu_prices():
    prices = load_prices(None, "cpu", num_cores=8)
    assert (prices.device.name, prices.num_devices_or_cores, prices.usd_per_kwh) == ("cpu", 8, 0.12)
    assert prices.usd_per_second == pytest.approx(0.045 * 8 / 3600)
    # one hour on 8 cores plus one kWh
    assert prices.usd(3600.0, 3.6e6) == pytest.approx(0.36 + 0.12)


def test_device_profile_counts_devices_not_cores():
    prices = load_prices("h200", "cpu", num_cores=8, usd_per_kwh=0.2)
    assert (prices.device.name, prices.num_devices_or_cores, prices.usd_per_kwh) == ("h200", 1, 0.2)
    assert prices.usd(3600.0, 0.0) == pytest.approx(3.50)


@pytest.mark.parametrize(
    "gpu, expected",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "h100"),
        ("NVIDIA GH200 480GB", "h100"),
        ("Tesla T4", "h100"),
    ],
)
def test_gpu_profile_guess(monkeypatch, gpu, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpu)
    assert guess_profile_name("cuda:0") == expected


def test_guess_needs_a_known_device():
    assert guess_profile_name("cpu") == "cpu"
    with pytest.raises(ValueError, match="no default price profile"):
        guess_profile_name("mps")


def test_toml_defines_a_profile_and_flags_win(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        'profile = "rack"\nusd_per_kwh = 0.30\nidle_watts = 20\n\n'
        "[profiles.rack]\nusd_per_hour = 1.0\nidle_watts = 10\npeak_watts = 100\n"
    )
    prices = load_prices(None, "cpu", num_cores=8, config_file=path, usd_per_hour=2.0)
    assert prices.device == DeviceProfile("rack", usd_per_hour=2.0, idle_watts=20, peak_watts=100)
    assert (prices.num_devices_or_cores, prices.usd_per_kwh) == (1, 0.30)
    flagged = load_prices("cpu", "cpu", num_cores=2, config_file=path, usd_per_kwh=0.1, idle_watts=2.0)
    assert flagged.device == DeviceProfile("cpu", 0.045, 2.0, 6.0, per_core=True)
    assert flagged.usd_per_kwh == 0.1


def test_json_overrides_a_builtin(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"usd_per_hour": 0.05, "peak_watts": 8}))
    prices = load_prices(None, "cpu", num_cores=4, config_file=path)
    assert prices.device == DeviceProfile("cpu", 0.05, 1.5, 8, per_core=True)
    assert prices.usd_per_second == pytest.approx(0.05 * 4 / 3600)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"profile_name": "tpu"}, "unknown price profile 'tpu'"),
        ({"usd_per_hour": -1.0}, "usd_per_hour must be >= 0"),
        ({"idle_watts": -1.0}, "idle_watts must be >= 0"),
        ({"peak_watts": 1.0}, "peak_watts must be >= idle_watts"),
        ({"usd_per_kwh": -0.1}, "usd_per_kwh must be >= 0"),
    ],
)
def test_bad_flags_are_rejected(kwargs, message):
    args = {"profile_name": None, "device": "cpu", "num_cores": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        load_prices(**args)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.toml", "usd_per_hour = 1\ncurrency = 'EUR'\n", r"unknown price config keys \['currency'\]"),
        (
            "a.toml",
            "[profiles.x]\nusd_per_hour = 1\nidle_watts = 1\npeak_watts = 2\ntdp = 3\n",
            r"profiles.x: unknown keys \['tdp'\]",
        ),
        ("a.toml", "[profiles.x]\nusd_per_hour = 1\n", r"missing keys \['idle_watts', 'peak_watts'\]"),
        ("a.toml", "usd_per_hour = true\n", "usd_per_hour must be a number"),
        ("a.json", '{"profile": "nope"}', "unknown price profile 'nope'"),
        ("a.yaml", "usd_per_hour: 1\n", "must be .toml or .json"),
    ],
)
def test_bad_config_files_are_rejected(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prices(None, "cpu", num_cores=2, config_file=path)


# --- attribution --------------------------------------------------------------------------------------


def test_split_step_is_proportional_to_tokens():
    parts = split_step(StepCost(seconds=2.0, joules=30.0, usd=0.6), {"a": 1, "b": 3, "idle": 0})
    assert set(parts) == {"a", "b"}
    assert (parts["a"].device_seconds, parts["a"].joules) == (0.5, 7.5)
    assert (parts["b"].device_seconds, parts["b"].joules) == (1.5, 22.5)
    assert (parts["a"].usd, parts["b"].usd) == (pytest.approx(0.15), pytest.approx(0.45))


def test_split_step_parts_sum_to_the_step():
    step = StepCost(seconds=0.1, joules=1.0, usd=1e-5)
    parts = split_step(step, {"a": 7, "b": 11, "c": 13})
    for field, total in (("device_seconds", 0.1), ("joules", 1.0), ("usd", 1e-5)):
        assert math.fsum(getattr(p, field) for p in parts.values()) == pytest.approx(total, rel=1e-14)


def test_split_step_edge_cases():
    step = StepCost(1.0, 1.0, 1.0)
    assert split_step(step, {}) == {}
    assert split_step(step, {"a": 0}) == {}
    with pytest.raises(ValueError, match=">= 0"):
        split_step(step, {"a": 2, "b": -1})


def test_request_cost_accumulates_and_rounds_only_on_output():
    cost = RequestCost()
    cost.add(RequestCost(usd=0.1, joules=1.0, device_seconds=0.5))
    cost.add(RequestCost(usd=0.2, joules=2.0, device_seconds=0.25))
    assert cost.usd == 0.1 + 0.2  # unrounded: 0.30000000000000004
    assert cost.as_dict("modelled") == {"usd": 0.3, "joules": 3.0, "device_seconds": 0.75, "energy_source": "modelled"}


class ScriptedMeter(PowerMeter):
    name, source = "scripted", "measured"

    def __init__(self, *readings: float) -> None:
        self._readings = list(readings)

    def energy_joules(self) -> float:
        return self._readings.pop(0)


def test_cost_meter_totals_equal_the_sum_over_requests():
    # $0.001 per device-second and $1e-6 per joule keep the expected dollars easy to read.
    prices = Prices(DeviceProfile("t", usd_per_hour=3.6, idle_watts=0.0, peak_watts=0.0), 1, usd_per_kwh=3.6)
    meter = CostMeter(
        ScriptedMeter(0.0, 100.0, 150.0, 200.0, 200.0, 210.0), prices, clock=ticks(0.0, 2.0, 5.0, 6.0, 6.0, 7.0)
    )
    assert meter.energy_source == "measured"
    per_request: dict[str, RequestCost] = {}
    for tokens in ({"a": 3, "b": 1}, {"b": 2}, {}):
        meter.begin_step()
        for rid, part in meter.end_step(tokens).items():
            per_request.setdefault(rid, RequestCost()).add(part)
    assert (meter.busy_seconds, meter.joules, meter.tokens) == (3.0, 150.0, 6)
    assert meter.usd == pytest.approx(0.003 + 0.00015)
    assert (per_request["a"].device_seconds, per_request["a"].joules) == (1.5, 75.0)
    assert (per_request["b"].device_seconds, per_request["b"].joules) == (1.5, 75.0)
    assert per_request["a"].usd == pytest.approx(0.0015 + 0.000075)
    assert math.fsum(p.usd for p in per_request.values()) == pytest.approx(meter.usd, rel=1e-14)


def test_cost_meter_refuses_unbalanced_steps():
    meter = CostMeter(ScriptedMeter(0.0, 0.0), load_prices(None, "cpu", 1), clock=ticks(0.0, 1.0))
    with pytest.raises(RuntimeError, match="without begin_step"):
        meter.end_step({"a": 1})
    meter.begin_step()
    with pytest.raises(RuntimeError, match="twice"):
        meter.begin_step()


def test_cost_meter_with_the_real_modelled_meter(tmp_path):
    prices = load_prices(None, "cpu", num_cores=2)
    meter = CostMeter(select_meter("cpu", prices.device, 2, powercap_root=tmp_path), prices)
    meter.begin_step()
    sum(i * i for i in range(200_000))
    parts = meter.end_step({"a": 1, "b": 1})
    assert meter.energy_source == "modelled"
    # The meter reads its own clock a moment after the cost meter's, hence the 10% slack around 3 W..12 W.
    assert 0.9 * 3.0 < meter.joules / meter.busy_seconds < 1.1 * 12.0
    assert parts["a"].as_dict(meter.energy_source)["energy_source"] == "modelled"
    assert parts["a"].usd == pytest.approx(meter.usd / 2)
