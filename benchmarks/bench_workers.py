"""Trials per hour with 1, 2, ... workers: the same study run side by side at each count.

Each count runs `hpo run SPEC --workers N` in a fresh folder (its own SQLite storage and MLflow
store) with the same seed and budget, and reports trials per hour over the study's own trial
timestamps (first start to last end) and over the whole command (start-up and the final test
evaluation included), and the ratio to one worker. On a GPU machine it also samples the GPU's
utilisation with nvidia-smi while the study runs.

    python benchmarks/bench_workers.py                                   # digits, 1 and 2 workers
    python benchmarks/bench_workers.py --spec search_spaces/mnist.yaml --workers 1 2 4 8 \
        --n-trials 16 --device cuda                                      # several per GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent


def _gpu_sampler() -> subprocess.Popen | None:
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
         "-lms", "500"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def run(spec: Path, workers: int, n_trials: int, device: str | None, seed: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"hpo-bench-{workers}w-"))
    cmd = [sys.executable, "-m", "hpo", "run", str(spec.resolve()), "--n-trials", str(n_trials),
           "--seed", str(seed), "--study-name", "bench"]  # fmt: skip
    cmd += ["--workers", str(workers)]  # given, also 1: on a GPU nothing is chosen for it
    if device:
        cmd += ["--device", device]
    gpu = _gpu_sampler()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    util = None
    if gpu is not None:
        gpu.terminate()
        samples = [float(x) for x in gpu.communicate()[0].split() if x.strip()]
        util = sum(samples) / len(samples) if samples else None
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'optuna.db'}")
    trials = [t for t in study.trials if t.datetime_complete is not None]
    span = (
        max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    ).total_seconds()
    best = study.best_value
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "workers": workers,
        "trials": len(trials),
        "trials_per_hour": 3600 * len(trials) / span,
        "trials_per_hour_whole_command": 3600 * len(trials) / wall,
        "seconds_in_trials": round(span, 1),
        "seconds_whole_command": round(wall, 1),
        "best_value": best,
        "gpu_utilisation_percent": util,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=REPO / "search_spaces" / "digits.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for n in args.workers:
        row = run(args.spec, n, args.n_trials, args.device, args.seed)
        rows.append(row)
        base = rows[0]["trials_per_hour"]
        gpu = row["gpu_utilisation_percent"]
        print(
            f"{args.spec.name}: {n} worker(s): {row['trials_per_hour']:8.0f} trials/h "
            f"({row['trials']} trials in {row['seconds_in_trials']} s; whole command "
            f"{row['seconds_whole_command']} s, {row['trials_per_hour_whole_command']:.0f}/h), "
            f"{row['trials_per_hour'] / base:.2f}x one worker, best {row['best_value']:.4f}"
            + (f", GPU busy {gpu:.0f}%" if gpu is not None else ""),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
