"""What each search-space option costs the trainer: one MNIST epoch of 784-512-512-10 at batch
size 128 with the option set, against the same epoch with ReLU and Adam.

The options are measured in interleaved rounds (one epoch of each per round), so a machine
that slows down over the run weighs on every option alike; each figure is the median over
--repeats rounds after a warm-up round. One row draws dropout's masks with `nn.Dropout`'s own
`bernoulli_`, as hpo did before it drew its own: against its twin, it shows what hpo's masks
save.

    HPO_DATA_DIR=/path/to/data python benchmarks/bench_options.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from hpo.config import parse_spec
from hpo.data import load_data
from hpo.model import build_mlp
from hpo.train import TrainConfig, flush_denormals, train

WIDTHS, BATCH = [512, 512], 128
BASE = "relu, adam"
TORCH_DROPOUT = "dropout 0.2, nn.Dropout's masks"
# name -> (build_mlp keywords, TrainConfig keywords)
OPTIONS: dict[str, tuple[dict, dict]] = {
    BASE: ({}, {}),
    "sgd, Nesterov momentum 0.9": ({}, {"optimizer": "sgd", "momentum": 0.9, "nesterov": True}),
    "sigmoid": ({"activation": "sigmoid"}, {}),
    "elu": ({"activation": "elu"}, {}),
    "gelu": ({"activation": "gelu"}, {}),
    "prelu": ({"activation": "prelu"}, {}),
    "batchnorm": ({"batchnorm": True}, {}),
    "dropout 0.2": ({"dropout": 0.2}, {}),
    TORCH_DROPOUT: ({"dropout": 0.2}, {}),
    "l1 1e-5": ({}, {"l1": 1e-5}),
    "grad_clip 1.0": ({}, {"grad_clip": 1.0}),
    "rmsprop, momentum 0.9": ({}, {"optimizer": "rmsprop", "momentum": 0.9}),
    "nadam": ({}, {"optimizer": "nadam"}),
}


def epoch(name: str, data, device: str) -> float:
    """Seconds of one training epoch (validation pass included) with option `name`."""
    model_kw, train_kw = OPTIONS[name]
    torch.manual_seed(0)
    model = build_mlp(784, 10, WIDTHS, **model_kw).to(device)
    cfg = TrainConfig(batch_size=BATCH, max_epochs=1, lr=1e-3, **train_kw)
    with contextlib.ExitStack() as patches:
        if name == TORCH_DROPOUT:
            patches.enter_context(mock.patch("hpo.steppers.train_forward", lambda m, x: m(x)))
        t0 = time.perf_counter()
        train(model, data.train, data.val, cfg)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(device: str, repeats: int = 3, warm_all: bool = True) -> list[dict]:
    """Median epoch time of each option and its ratio to the ReLU/Adam epoch. A first round
    warms up every option, or with `warm_all` False the base one alone."""
    spec = parse_spec({"name": "bench", "dataset": {"name": "mnist"}, "search_space": {}})
    data = load_data(spec, device)
    times: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name in OPTIONS if round_ or warm_all else [BASE]:
            sec = epoch(name, data, device)
            if round_:
                times[name].append(sec)
    base = statistics.median(times[BASE])
    rows = []
    for name, secs in times.items():
        sec = statistics.median(secs)
        rows.append({"option": name, "epoch_s": sec, "ratio": sec / base})
        print(f"{name:<38} {sec:6.3f} s/epoch  {sec / base:5.2f}x")
    return rows


def main() -> None:
    flush_denormals()  # as hpo's processes do, before the first torch operation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/options.json")
    args = parser.parse_args()
    rows = measure(args.device, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
