"""Does k-fold selection choose better configurations on small data? Studies side by side.

For each shipped small-data spec (digits.yaml, wine_csv.yaml) and each study seed, two studies
with the same wall-time budget: one validation split (the spec as shipped) and 5-fold
cross-validation over the same training pool (`dataset.split.folds: 5`, the chosen trial
refit on the pool). Both are tested once on the same held-out test split. Reports the chosen
configuration's test accuracy, mean and spread over the seeds, for both, and how many trials
each could afford.

    python benchmarks/bench_small_data.py [--seeds 5] [--seconds 45 20] [--out reports]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

import hpo
from hpo.config import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped import ROOT, shipped_spec, write_results  # noqa: E402

SPECS = ("digits.yaml", "wine_csv.yaml")


def _study(path: Path, folds: bool, seed: int, seconds: float, where: Path) -> dict:
    name = f"{load_spec(path).name}-{'folds' if folds else 'split'}-{seed}"
    spec = shipped_spec(path.name)
    if folds:
        spec["dataset"]["split"].pop("val", None)
        spec["dataset"]["split"]["folds"] = 5
    spec["name"] = name
    copy = where / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = hpo.run(
        copy,
        n_trials=1000,
        timeout=seconds,
        seed=seed,
        storage=f"sqlite:///{where / 'optuna.db'}",
        tracking_uri=f"sqlite:///{where / 'mlflow.db'}",
        progress=False,
        tracking={"log_model": "none"},
    )
    return {
        "spec": path.name,
        "mode": "5 folds" if folds else "one split",
        "seed": seed,
        "trials": result.summary.counts.get("COMPLETE", 0)
        + result.summary.counts.get("PRUNED", 0),
        "best_val": result.summary.best_value,
        "test_accuracy": result.summary.test_metrics.get("test_accuracy"),
    }


def measure(seeds: int, seconds: dict[str, float]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SPECS:
            for seed in range(seeds):
                for folds in (False, True):
                    rows.append(
                        _study(
                            ROOT / "search_spaces" / name, folds, seed, seconds[name], Path(tmp)
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| spec | selection | studies | trials a study | test accuracy, mean ± sd | each |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for name in SPECS:
        for mode in ("one split", "5 folds"):
            mine = [r for r in rows if r["spec"] == name and r["mode"] == mode]
            tests = [r["test_accuracy"] for r in mine if r["test_accuracy"] is not None]
            if not tests:
                continue
            sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
            trials = statistics.mean(r["trials"] for r in mine)
            each = ", ".join(f"{t:.4f}" for t in tests)
            lines.append(
                f"| {name} | {mode} | {len(mine)} | {trials:.0f} | "
                f"{statistics.mean(tests):.4f} ± {sd:.4f} | {each} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seconds", type=float, nargs=2, default=[45.0, 20.0])
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    rows = measure(args.seeds, dict(zip(SPECS, args.seconds, strict=True)))
    write_results(args.out, "small_data", rows, render)


if __name__ == "__main__":
    main()
