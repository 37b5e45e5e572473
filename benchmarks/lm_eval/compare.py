"""Per-sample comparison of two lm-eval runs with --log_samples (tokenfab served vs. transformers on the same
weights): the largest log-likelihood difference, and whether every generation is the same.

    python benchmarks/lm_eval/compare.py OUT_A OUT_B     # the two --output_path folders
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def samples(folder: str) -> dict[tuple[str, int], dict]:
    found = {}
    for path in Path(folder).rglob("samples_*.jsonl"):
        task = path.name.split("samples_")[1].rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found[(task, row["doc_id"])] = row
    return found


def main(a: str, b: str) -> None:
    left, right = samples(a), samples(b)
    assert left.keys() == right.keys(), "the runs scored different samples"
    worst, loglik, same_text, generations = 0.0, 0, 0, 0
    for key, row in left.items():
        for x, y in zip(row["resps"], right[key]["resps"]):
            if isinstance(x[0], list):  # loglikelihood: [logprob, is_greedy]
                worst, loglik = max(worst, abs(float(x[0][0]) - float(y[0][0]))), loglik + 1
            else:
                same_text, generations = same_text + (x[0] == y[0]), generations + 1
    print(f"{loglik} log-likelihoods: largest difference {worst:.2e} nats")
    print(f"{generations} generations: {same_text} identical")


if __name__ == "__main__":
    main(*sys.argv[1:3])
