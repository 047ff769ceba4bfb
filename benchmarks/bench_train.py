"""Training throughput on MNIST: hpo's trainer vs a plain DataLoader loop, one epoch each.

Both do the same work per epoch: a shuffled pass over the 54,000 training images at batch size
512 with Adam, then a pass over the 6,000 validation images. Reports samples per second
(training images / epoch wall time), median of --repeats rounds after a warm-up round; each
round runs one epoch of every loop, so the loops are measured side by side.

    HPO_DATA_DIR=/path/to/data python benchmarks/bench_train.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hpo.config import parse_spec
from hpo.data import load_data
from hpo.model import build_mlp, count_parameters
from hpo.train import TrainConfig, bf16_native, flush_denormals, products, train

BATCH = 512
# name -> (hidden widths, dropout). The dropout row is a net from mnist.yaml's search space:
# its masks cost as much as the layers' products with nn.Dropout on a CPU.
ARCHS = {
    "784-64-64-10": ([64, 64], 0.0),
    "784-512-512-10": ([512, 512], 0.0),
    "784-512-512-10 dropout 0.2": ([512, 512], 0.2),
}


def hpo_epoch(net, data, device, precision="auto") -> float:
    torch.manual_seed(0)
    model = build_mlp(784, 10, net[0], dropout=net[1]).to(device)
    cfg = TrainConfig(batch_size=BATCH, max_epochs=1, lr=1e-3, precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    train(model, data.train, data.val, cfg)
    _sync(device)
    return time.perf_counter() - t0


def hpo_epoch_launched(net, data, device) -> float:
    """hpo's trainer with every step's kernels launched one by one (`HPO_CUDA_GRAPHS=0`),
    not replayed as a CUDA graph."""
    with mock.patch.dict(os.environ, {"HPO_CUDA_GRAPHS": "0"}):
        return hpo_epoch(net, data, device)


def dataloader_epoch(net, data, device) -> float:
    """The loop most tutorials write: CPU tensors, a DataLoader, .item() per step, and torch's
    default float32 products, nn.Dropout."""
    with products("fp32", torch.device(device)):  # IEEE float32, torch's default
        torch.manual_seed(0)
        model = build_mlp(784, 10, net[0], dropout=net[1]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train_ds = TensorDataset(data.train[0].cpu(), data.train[1].cpu())
        val_ds = TensorDataset(data.val[0].cpu(), data.val[1].cpu())
        _sync(device)
        t0 = time.perf_counter()
        model.train()
        running = 0.0
        for xb, yb in DataLoader(train_ds, batch_size=BATCH, shuffle=True):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * len(xb)
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in DataLoader(val_ds, batch_size=BATCH):
                correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
        _sync(device)
        return time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loops(device: str) -> list[tuple[str, str, object]]:
    """(name, precision of its products, one epoch) of each loop measured. bf16 only where
    the device has bfloat16 units: elsewhere it is emulated (18x slower than fp32 for the
    wide net on an AVX2 CPU), which `hpo run` warns about, and would take most of the run."""
    dev = torch.device(device)
    default = "tf32" if dev.type == "cuda" else "fp32"
    bf16 = [("hpo.train bf16", "bf16", lambda *a: hpo_epoch(*a, precision="bf16"))]
    launched = [("hpo.train, no graphs", default, hpo_epoch_launched)]
    return [
        ("hpo.train", default, hpo_epoch),
        *(launched if dev.type == "cuda" else []),
        *(bf16 if bf16_native(dev) else []),
        ("DataLoader", "fp32", dataloader_epoch),
    ]


def measure(
    device: str, repeats: int = 3, peak: Callable[[str], tuple[float, float]] | None = None
) -> list[dict]:
    """Median epoch time of each loop on each net, with its FLOP/s (6 x parameters/sample).

    With `peak` (precision -> (sustained, burst) FLOP/s of the device's products, measured when
    called), each round measures the peak too, just before its epochs, and a loop's share of
    the peak is the median over rounds of its FLOP/s over that round's sustained peak (and
    over its burst peak): on a shared machine whose speed drifts, a peak taken minutes apart
    from the epochs is off by as much as 40%."""
    spec = parse_spec({"name": "bench", "dataset": {"name": "mnist"}, "search_space": {}})
    data = load_data(spec, device)
    n = len(data.train[0])
    print(
        f"MNIST {n} train / {len(data.val[0])} val images, batch {BATCH}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for name, net in ARCHS.items():
        params = count_parameters(build_mlp(784, 10, net[0]))
        # Interleaved (one epoch of each loop per round): a machine that slows down or speeds
        # up over the run weighs on every loop alike.
        times: dict[str, list[float]] = {loop: [] for loop, _, _ in loops(device)}
        shares: dict[str, list[float]] = {loop: [] for loop, _, _ in loops(device)}
        burst_shares: dict[str, list[float]] = {loop: [] for loop, _, _ in loops(device)}
        for round_ in range(repeats + 1):  # round 0 warms up
            peaks = {p: peak(p) for p in {p for _, p, _ in loops(device)}} if peak else {}
            for loop, precision, fn in loops(device):
                sec = fn(net, data, device)
                if round_:
                    times[loop].append(sec)
                    if peak:
                        sustained, burst = peaks[precision]
                        shares[loop].append(6 * params * n / sec / sustained)
                        burst_shares[loop].append(6 * params * n / sec / burst)
        for loop, precision, _ in loops(device):
            sec = statistics.median(times[loop])
            row = {
                "arch": name,
                "loop": loop,
                "precision": precision,
                "epoch_s": sec,
                "samples_per_s": n / sec,
                "flops": 6 * params * n / sec,
            }
            if peak:
                row["fraction_of_peak"] = statistics.median(shares[loop])
                row["fraction_of_burst_peak"] = statistics.median(burst_shares[loop])
            rows.append(row)
            print(f"{name:<26} {loop:<20} {sec:7.2f} s/epoch  {n / sec:10,.0f} samples/s")
    for name in ARCHS:
        speed = {r["loop"]: r["samples_per_s"] for r in rows if r["arch"] == name}
        for loop in speed:
            if loop != "DataLoader":
                print(f"{name:<26} {loop:<20} speed-up {speed[loop] / speed['DataLoader']:.2f}x")
    return rows


def main() -> None:
    flush_denormals()  # as hpo's processes do, before the first torch operation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    rows = measure(args.device, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
