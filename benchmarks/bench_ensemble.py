"""The ensemble of the best trials against the best trial alone, on the test split.

Runs each spec as shipped, with `tracking.ensemble: {size: 10}` (greedy selection from the
best 10), for several study seeds, and reports the best trial's test accuracy beside the
ensemble's: digits.yaml, wine_csv.yaml, and scikit-learn's breast-cancer table written as a
CSV (569 rows, 30 features) searched with wine_csv.yaml's space. mnist.yaml ships with its
ensemble on: its figures come from `hpo run search_spaces/mnist.yaml`.

    python benchmarks/bench_ensemble.py [--seeds 3] [--out reports]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import hpo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped import ROOT, shipped_spec, write_results  # noqa: E402


def _specs(where: Path) -> dict[str, dict]:
    from sklearn.datasets import load_breast_cancer

    specs = {name: shipped_spec(name) for name in ("digits.yaml", "wine_csv.yaml")}
    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = frame.pop("target").map({0: "malignant", 1: "benign"})
    frame.to_csv(where / "breast_cancer.csv", index=False)
    cancer = json.loads(json.dumps(specs["wine_csv.yaml"]))
    cancer["name"] = "breast-cancer-csv"
    cancer["dataset"] |= {"path": str(where / "breast_cancer.csv"), "target": "diagnosis"}
    specs["breast_cancer.csv"] = cancer
    return specs


def measure(seeds: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        for label, spec in _specs(where).items():
            for seed in range(seeds):
                spec = dict(spec, name=f"{spec['name']}-ens-{seed}")
                spec["tracking"] = {"log_model": "best", "ensemble": {"size": 10}}
                result = hpo.run(
                    spec,
                    seed=seed,
                    storage=f"sqlite:///{where / 'optuna.db'}",
                    tracking_uri=f"sqlite:///{where / 'mlflow.db'}",
                    progress=False,
                )
                s = result.summary
                e = s.ensemble or {}
                rows.append({
                    "spec": label, "seed": seed, "trials": s.counts.get("COMPLETE", 0),
                    "best_test": s.test_metrics.get("test_accuracy"),
                    "ensemble_test": e.get("test_accuracy"),
                    "ensemble_members": len(e.get("members", {})),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| data | studies | best trial, test accuracy | ensemble, test accuracy | members |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == label and r["ensemble_test"] is not None]
        if not mine:
            continue
        best = statistics.mean(r["best_test"] for r in mine)
        ens = statistics.mean(r["ensemble_test"] for r in mine)
        size = statistics.mean(r["ensemble_members"] for r in mine)
        lines.append(f"| {label} | {len(mine)} | {best:.4f} | {ens:.4f} | {size:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    write_results(args.out, "ensemble", measure(args.seeds), render)


if __name__ == "__main__":
    main()
