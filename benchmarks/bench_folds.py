"""K-fold cross-validation as one fused cohort vs the folds one after the other, side by side.

A digits configuration as `search_spaces/digits.yaml` samples them (64-128-128-10, ReLU, Adam,
batch 64, 15 epochs, no early stopping) on `dataset.split.folds: 5`: one fold alone, the five
folds one after the other, and the five as one cohort (`hpo.train.fit` with each member's own
rows), each with the torch threads a worker would give it (`hpo.executors.worker.threads_for`:
one for a small step). Reports each one's wall time as a multiple of one fold alone; medians of
--repeats rounds after a warm-up. The goal (issue "Results you can trust on small data"): the
five folds fused cost at most 2.5x one fold; one after the other they cost about 5x.

    python benchmarks/bench_folds.py [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hpo.config import parse_spec
from hpo.data import load_data
from hpo.executors.worker import SMALL_STEP
from hpo.model import build_mlp
from hpo.train import TrainConfig, fit, flush_denormals

K, EPOCHS, WIDTHS, BATCH = 5, 15, [128, 128], 64


def _spec(device: str):
    return parse_spec(
        {
            "name": "bench-folds",
            "dataset": {"name": "digits", "split": {"folds": K}},
            "search_space": {"n_layers": 2},
            "training": {"device": device},
        }
    )


def _members(data, k: int, device):
    cfgs = [
        TrainConfig(optimizer="adam", lr=1e-3, batch_size=BATCH, max_epochs=EPOCHS,
                    patience=EPOCHS + 1, seed=7)
        for _ in range(k)
    ]  # fmt: skip
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_mlp(data.n_features, data.n_outputs, WIDTHS).to(device))
    return models, cfgs


def _threads(models, k: int) -> int:
    params = sum(p.numel() for p in models[0].parameters())
    return 1 if params * BATCH * k < SMALL_STEP else max(torch.get_num_threads(), 1)


def _timed(data, folds: list[int], fused: bool, device) -> float:
    """Wall time of training `folds` as one cohort (`fused`) or one after the other."""
    groups = [folds] if fused else [[f] for f in folds]
    total = 0.0
    threads = torch.get_num_threads()
    for group in groups:
        models, cfgs = _members(data, len(group), device)
        torch.set_num_threads(_threads(models, len(group)))
        rows = [data.folds[f] for f in group]
        _sync(device)
        t0 = time.perf_counter()
        fit(models, cfgs, data.train, data.train, own_rows=rows)
        _sync(device)
        total += time.perf_counter() - t0
        torch.set_num_threads(threads)
    return total


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: str, repeats: int) -> dict:
    """One fold, K folds one after the other, K folds fused: seconds and ratios to one fold."""
    flush_denormals()
    data = load_data(_spec(device), device)
    _timed(data, [0, 1], True, device)  # warm-up: the first optimizer's imports, allocations
    rounds = {"one fold": [], f"{K} folds one after the other": [], f"{K} folds fused": []}
    for _ in range(repeats):
        rounds["one fold"].append(_timed(data, [0], False, device))
        rounds[f"{K} folds one after the other"].append(
            _timed(data, list(range(K)), False, device)
        )
        rounds[f"{K} folds fused"].append(_timed(data, list(range(K)), True, device))
    one = statistics.median(rounds["one fold"])
    rows = []
    for name, times in rounds.items():
        seconds = statistics.median(times)
        rows.append({"variant": name, "seconds": round(seconds, 3), "x_one_fold": seconds / one})
    return {
        "config": f"digits 64-{WIDTHS[0]}-{WIDTHS[1]}-10, Adam, batch {BATCH}, {EPOCHS} epochs",
        "pool": len(data.train[0]),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.device, args.repeats), indent=2))


if __name__ == "__main__":
    main()
