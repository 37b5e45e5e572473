"""StepCostModel: an engine step's wall time from what it computes, fitted from measured steps.

    t = a + b * prefill_tokens + c * prefill_attention + d * decode_seqs + e * decode_context

`prefill_attention` is the prompt chunks' tokens x the context they attend to (attention's quadratic part, in
tokens^2 / 1000), `decode_context` the KV tokens the decoding sequences read. Coefficients are non-negative (a
least-squares fit with negative terms dropped and refitted), so the model never predicts that more work is faster.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokenfab.engine.types import StepPlan

FEATURES = ("overhead", "prefill_tokens", "prefill_attention", "decode_seqs", "decode_context")


@dataclass(frozen=True, slots=True)
class StepFeatures:
    prefill_tokens: int = 0
    prefill_attention: float = 0.0
    """Sum over prompt chunks of tokens x (context before the chunk + half the chunk), / 1000."""
    decode_seqs: int = 0
    decode_context: int = 0

    @classmethod
    def of(cls, plan: StepPlan) -> StepFeatures:
        prefill = seqs = context = 0
        attention = 0.0
        for s in plan.scheduled:
            if s.start >= s.request.num_prompt_tokens:  # generating: one token (plus drafts) per step
                seqs += 1
                context += s.start
            else:
                prefill += s.num_tokens
                attention += s.num_tokens * (s.start + s.num_tokens / 2) / 1000
        return cls(prefill, attention, seqs, context)

    def row(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.prefill_attention, self.decode_seqs, self.decode_context]


@dataclass(slots=True)
class StepCostModel:
    coef: dict[str, float]
    """Seconds per unit of each feature (`overhead`: per step)."""
    meta: dict = field(default_factory=dict)
    """Where it was measured: machine, versions, model, weight format, threads, fit error."""
    serving_step_s: float = 0.0
    """What serving adds to every step beyond the engine's own time (outputs to the front end, streaming: work
    sharing the machine), measured against a live server (`calibrate`)."""
    request_latency_s: float = 0.0
    """What a request spends before the engine sees it (HTTP, templating, tokenizing) while the engine is idle,
    measured likewise..."""
    busy_request_latency_s: float | None = None
    """...and while it is busy (the front end then shares the machine's cores with it); None: as when idle."""

    def predict(self, f: StepFeatures) -> float:
        """A served step's seconds."""
        return self.engine_seconds(f) + self.serving_step_s

    def engine_seconds(self, f: StepFeatures) -> float:
        """The engine's own time for the step (what the profile measured)."""
        return sum(self.coef[name] * x for name, x in zip(FEATURES, f.row()))

    @classmethod
    def fit(cls, samples: list[tuple[StepFeatures, float]], meta: dict | None = None) -> StepCostModel:
        if len(samples) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} measured steps to fit, got {len(samples)}")
        x = np.array([f.row() for f, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        active = list(range(len(FEATURES)))
        coef = np.zeros(len(FEATURES))
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0
                coef[active] = sol
                break
            active = [a for a, s in zip(active, sol) if s >= 0] if (sol >= 0).any() else []
        model = cls({name: float(c) for name, c in zip(FEATURES, coef)}, dict(meta or {}))
        predicted = x @ coef  # the engine's own time: serving terms are calibrated later
        rel = np.abs(predicted - y) / np.maximum(y, 1e-9)
        model.meta.update(
            steps=len(samples), median_rel_error=float(np.median(rel)), p90_rel_error=float(np.percentile(rel, 90))
        )
        return model

    def save(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / "step_cost.json"
        out.write_text(json.dumps({"features": FEATURES, **asdict(self)}, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> StepCostModel:
        path = Path(directory)
        path = path / "step_cost.json" if path.is_dir() else path
        data = json.loads(path.read_text())
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(
                f"{path}: a step-cost profile of other features {data.get('features')}; run tokenfab profile"
            )
        return cls(
            {k: float(v) for k, v in data["coef"].items()},
            data.get("meta", {}),
            float(data.get("serving_step_s", 0.0)),
            float(data.get("request_latency_s", 0.0)),
            data.get("busy_request_latency_s"),
        )


def machine_meta() -> dict:
    import torch

    from tokenfab.platform import cpu_isa, machine
    from tokenfab.version import __version__

    return {
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenfab": __version__,
    }
