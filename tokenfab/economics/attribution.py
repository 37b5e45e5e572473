"""Attribution: measure each engine step's time, energy and price, and split it over its requests by tokens.

A prefill-chunk token and a decode token are charged alike: a step is one batched forward pass, and a split
by tokens is the simplest rule that adds up exactly. It ignores that a token attending over a long context
costs a little more than one attending over a short one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tokenfab.platform.power import EnergySource, PowerMeter
from tokenfab.platform.prices import Prices


@dataclass(slots=True)
class RequestCost:
    """Running cost of one request; kept unrounded so the parts keep summing to the engine's totals."""

    usd: float = 0.0
    joules: float = 0.0
    device_seconds: float = 0.0

    def add(self, other: RequestCost) -> None:
        self.usd += other.usd
        self.joules += other.joules
        self.device_seconds += other.device_seconds

    def as_dict(self, energy_source: EnergySource) -> dict[str, float | str]:
        return {
            "usd": _round(self.usd),
            "joules": _round(self.joules),
            "device_seconds": _round(self.device_seconds),
            "energy_source": energy_source,
        }


@dataclass(frozen=True, slots=True)
class StepCost:
    """What one engine step took, in wall seconds on the device, joules, and dollars."""

    seconds: float
    joules: float
    usd: float


def split_step(cost: StepCost, tokens: Mapping[str, int]) -> dict[str, RequestCost]:
    """Each request's share of the step, in proportion to its tokens; requests with no tokens are left out."""
    if any(n < 0 for n in tokens.values()):
        raise ValueError(f"token counts must be >= 0, got {dict(tokens)}")
    total = sum(tokens.values())
    if total == 0:
        return {}
    return {
        rid: RequestCost(cost.usd * n / total, cost.joules * n / total, cost.seconds * n / total)
        for rid, n in tokens.items()
        if n > 0
    }


class CostMeter:
    """Brackets engine steps with clock and energy readings and keeps the running totals.

    Totals are sums over the attributed steps only, so the per-request costs always add up to them; a step
    that processed no tokens has no one to bill and is left out of both.
    """

    __slots__ = ("_clock", "_last_end", "_meter", "_open", "_prices", "busy_seconds", "joules", "tokens", "usd")

    def __init__(self, meter: PowerMeter, prices: Prices, clock: Callable[[], float] = time.monotonic) -> None:
        self._meter, self._prices, self._clock = meter, prices, clock
        self._open: tuple[float, float] | None = None
        self._last_end: tuple[float, float] | None = None
        self.busy_seconds = 0.0
        self.joules = 0.0
        self.usd = 0.0
        self.tokens = 0

    @property
    def energy_source(self) -> EnergySource:
        return self._meter.source

    @property
    def meter_name(self) -> str:
        return self._meter.name

    @property
    def prices(self) -> Prices:
        return self._prices

    def begin_step(self) -> None:
        if self._open is not None:
            raise RuntimeError("begin_step called twice without end_step")
        self._open = (self._clock(), self._meter.energy_joules())

    def continue_step(self) -> None:
        """Begin a step where the previous one ended: while work is queued back to back, the time between
        steps (collecting requests, sending outputs) is spent on the same requests and is billed with them."""
        if self._last_end is None:
            self.begin_step()
            return
        if self._open is not None:
            raise RuntimeError("continue_step called while a step is open")
        self._open = self._last_end

    def end_step(self, tokens: Mapping[str, int]) -> dict[str, RequestCost]:
        if self._open is None:
            raise RuntimeError("end_step called without begin_step")
        (start, start_joules), self._open = self._open, None
        end, end_joules = self._clock(), self._meter.energy_joules()
        self._last_end = (end, end_joules)
        seconds, joules = end - start, end_joules - start_joules
        step = StepCost(seconds, joules, self._prices.usd(seconds, joules))
        parts = split_step(step, tokens)
        if parts:
            self.busy_seconds += step.seconds
            self.joules += step.joules
            self.usd += step.usd
            self.tokens += sum(tokens.values())
        return parts


def _round(x: float) -> float:
    """Ten significant digits: far below a cent at any realistic scale, and free of float noise in JSON."""
    return float(f"{x:.10g}")
