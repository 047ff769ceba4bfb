"""Fused trials vs the same trials one after the other, on MNIST, side by side in one run.

For each net (784-64-64-10 and 784-512-512-10, batch size 512, Adam) and each K, trains K
members (each its own seed and learning rate) for one epoch, first one after the other with
`hpo.train.train`, then as one cohort with `hpo.train.fit`, and reports samples per
second (K x training images / wall time) and the ratio. Each round trains both ways; medians
of --repeats rounds (3 at least for the small net) after a warm-up.

    HPO_DATA_DIR=/path/to/data python benchmarks/bench_fused.py [--ks 1 4 8 16 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hpo.config import parse_spec
from hpo.data import load_data
from hpo.model import build_mlp
from hpo.train import TrainConfig, fit, flush_denormals, train

BATCH = 512
# name -> (hidden widths, fewest rounds). A small net's epoch lasts a quarter of a second, so
# one round of it is mostly this shared machine's noise (sequential throughput alone swung 30%
# between two K in one quick run): 3 rounds at least, also under --quick, where they cost 15 s.
ARCHS = {"784-64-64-10": ([64, 64], 3), "784-512-512-10": ([512, 512], 1)}


def _configs(k: int) -> list[TrainConfig]:
    return [
        TrainConfig(batch_size=BATCH, max_epochs=1, lr=1e-3 * (1 + i), seed=i, shuffle_seed=0)
        for i in range(k)
    ]


def _models(widths, cfgs, device):
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_mlp(784, 10, widths).to(device))
    return models


def sequential(widths, k, data, device) -> float:
    cfgs = _configs(k)
    models = _models(widths, cfgs, device)
    _sync(device)
    t0 = time.perf_counter()
    for model, cfg in zip(models, cfgs, strict=True):
        train(model, data.train, data.val, cfg)
    _sync(device)
    return time.perf_counter() - t0


def fused(widths, k, data, device) -> float:
    cfgs = _configs(k)
    models = _models(widths, cfgs, device)
    _sync(device)
    t0 = time.perf_counter()
    fit(models, cfgs, data.train, data.val)
    _sync(device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(device: str, ks: list[int], repeats: int = 3) -> list[dict]:
    """Samples per second of K trials one after the other and fused, for each net and K."""
    gpu = torch.device(device).type == "cuda"
    spec = parse_spec({"name": "bench", "dataset": {"name": "mnist"}, "search_space": {}})
    data = load_data(spec, device)
    n = len(data.train[0])
    name = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"MNIST {n} train images, batch {BATCH}, Adam, {name}, torch {torch.__version__}")
    rows = []
    for arch, (widths, fewest) in ARCHS.items():
        sequential(widths, 1, data, device)  # warm-up
        fused(widths, 2, data, device)
        for k in ks:
            # Side by side: each round times both, and the ratio is the median of the rounds'.
            rounds = [
                (sequential(widths, k, data, device), fused(widths, k, data, device))
                for _ in range(max(repeats, fewest))
            ]
            seq = statistics.median(s for s, _ in rounds)
            fus = statistics.median(f for _, f in rounds)
            ratio = statistics.median(s / f for s, f in rounds)
            rows.append(
                {
                    "arch": arch,
                    "k": k,
                    "rounds": len(rounds),
                    "sequential_samples_per_s": k * n / seq,
                    "fused_samples_per_s": k * n / fus,
                    "ratio": ratio,
                }
            )
            print(
                f"{arch:<16} K={k:<4} sequential {k * n / seq:10,.0f}/s  "
                f"fused {k * n / fus:10,.0f}/s  ratio {ratio:5.2f}x"
            )
    return rows


def main() -> None:
    flush_denormals()  # as hpo's processes do, before the first torch operation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="K = 1, 4, 8; 1 round (small net: 3)")
    parser.add_argument("--out", default="benchmarks/results/fused.json")
    args = parser.parse_args()
    gpu = torch.device(args.device).type == "cuda"
    ks = args.ks or ([1, 4, 8] if args.quick else [1, 4, 8, 16, 32] + ([64, 128] if gpu else []))
    rows = measure(args.device, ks, 1 if args.quick else args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
