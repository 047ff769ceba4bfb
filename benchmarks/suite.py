"""The benchmark suite: writes reports/benchmarks.md and reports/benchmarks.json.

Every figure is a ratio of two things measured side by side in this run, on the device named
at the top (absolute times on shared machines are noise):

1. the trainer vs a plain DataLoader loop, one MNIST epoch, and the fraction of the device's
   own matrix-product peak (measured here, sustained: products run back to back, as in an
   epoch; the single fastest product, the burst peak, is given beside it) that each reaches,
   counting 6 x parameters FLOPs per training sample;
2. K fused trials vs the same K one after the other;
3. platform overhead: the share of a study's span outside its epochs, and the driver's time
   in each step of a trial's life (`hpo.results.STEPS`);
4. time to target: seconds until a finished trial first reaches 98% MNIST validation accuracy,
   for `hpo run search_spaces/mnist.yaml` (with and without its baselines, with and without
   fused trials) and for the plain Optuna script in benchmarks/plain_optuna.py;
5. what each search-space option costs: an epoch with it against one with ReLU and Adam
   (benchmarks/bench_options.py);
6. k-fold cross-validation: a digits configuration's five folds as one cohort against one
   fold alone and the five one after the other (benchmarks/bench_folds.py);
7. on a GPU only (or `--only budget`): `hpo run search_spaces/mnist.yaml`'s whole budget as a
   user runs it, workers and cohorts chosen for them, with the machine sampled every second
   into the study's MLflow run: wall time, the study's span, the GPU's busy share of the span,
   and the test accuracy.

    HPO_DATA_DIR=/path/to/data python benchmarks/suite.py [--quick] [--device cuda]

`--quick` keeps the whole suite under 10 minutes on a 2-core laptop (fewer repeats, K up to 8,
time to target capped at 45 s a variant); the full suite caps each variant at 15 minutes.
Each section's wall time is in the JSON (`seconds`) and at the end of the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_folds  # noqa: E402
import bench_fused  # noqa: E402
import bench_options  # noqa: E402
import bench_train  # noqa: E402

from hpo.train import bf16_native, flush_denormals, products  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# Time to target stops a variant that has not reached it after this long (seconds).
QUICK_CAP_S, FULL_CAP_S = 45.0, 900.0

# The shapes the peak is measured on: large squares, and the trainer's own first-layer product
# (on 2 AMD EPYC cores, 512-row products ran 10-15% faster than 2048 x 2048 ones, so a peak
# taken from the large square alone put the wide net at 110% of it). A GPU needs larger ones
# to fill its units.
PEAK_SHAPES = ((2048, 2048, 2048), (1024, 1024, 1024), (512, 512, 512), (512, 784, 512))
GPU_PEAK_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096))
# How long each shape's products run back to back for the sustained peak (seconds).
PEAK_SECONDS = 0.25


class Peak(NamedTuple):
    """FLOP/s of a device's matrix products: `sustained`, the best over the shapes of one
    shape's products run back to back for `PEAK_SECONDS` (what an epoch, itself a second or
    more of products, can reach), and `burst`, the fastest product (on a GPU, of 8 queued
    together, which hides their launch): on a shared 2-core machine the burst ran 5-15% above
    the sustained rate of the same shapes."""

    sustained: float
    burst: float


def peak_shapes(device: str) -> tuple[tuple[int, int, int], ...]:
    gpu = torch.device(device).type == "cuda"
    return (GPU_PEAK_SHAPES if gpu else ()) + PEAK_SHAPES


def matmul_peak(device: str, precision: str = "fp32") -> Peak:
    """The peak of `device`'s matrix products with `precision`'s products (fp32, tf32 on CUDA,
    bf16)."""
    gpu = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    queued = 8 if gpu else 1  # products timed together: one wait for the GPU per 8
    sustained = burst = 0.0
    with products(precision, torch.device(device)):
        for m, k, n in peak_shapes(device):
            flops = 2 * m * k * n
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            out = torch.empty(m, n, device=device, dtype=dtype)
            for _ in range(2):  # warm-up
                torch.mm(a, b, out=out)
            bench_train._sync(device)
            calls, fastest, start = 0, float("inf"), time.perf_counter()
            while (elapsed := time.perf_counter() - start) < PEAK_SECONDS:
                t0 = time.perf_counter()
                for _ in range(queued):
                    torch.mm(a, b, out=out)
                bench_train._sync(device)
                fastest = min(fastest, (time.perf_counter() - t0) / queued)
                calls += queued
            sustained = max(sustained, flops * calls / elapsed)
            burst = max(burst, flops / fastest)
    return Peak(sustained, burst)


def trainer_section(device: str, repeats: int) -> dict:
    """Each loop's share of the peak of the products it computes with, the peak measured in
    every round beside the epochs (see `bench_train.measure`)."""
    peaks: dict[str, list[Peak]] = {}

    def peak(precision: str) -> Peak:
        measured = matmul_peak(device, precision)
        peaks.setdefault(precision, []).append(measured)
        return measured

    rows = bench_train.measure(device, repeats, peak)
    medians = {
        p: statistics.median(m.sustained for m in measured) for p, measured in peaks.items()
    }
    bursts = {p: statistics.median(m.burst for m in measured) for p, measured in peaks.items()}
    return {
        "matmul_peak_flops": medians["fp32"],
        "matmul_peaks": medians,
        "matmul_burst_peaks": bursts,
        "peak_shapes": peak_shapes(device),
        "rows": rows,
    }


# ------------------------------------------------------------------ platform overhead


def overhead_section(device: str, quick: bool) -> list[dict]:
    """Run a study per dataset through `hpo.run`, as a user does, and compare its span (the
    first trial asked to the last told) with the seconds its workers trained; the driver's own
    timings (`StudyResult.bookkeeping`) say where the rest went, step by step."""
    import optuna

    import hpo
    from hpo.results import STEPS

    out = []
    cases = [
        # digits.yaml as shipped (its baselines, pruner and 40 epochs): the first study most
        # users run; mnist.yaml's search space, a few short trials without pruning
        ("digits", "search_spaces/digits.yaml", 12 if quick else 30, None),
        ("mnist", "search_spaces/mnist.yaml", 4 if quick else 8, 5 if quick else 10),
    ]
    for name, spec_path, n_trials, epochs in cases:
        spec = yaml.safe_load((ROOT / spec_path).read_text())
        spec["training"]["device"] = device
        if epochs is not None:
            spec["baselines"] = []
            spec["training"]["max_epochs"] = epochs
            spec["study"]["pruner"] = {"name": "none"}
        with tempfile.TemporaryDirectory() as folder:
            storage = f"sqlite:///{folder}/optuna.db"
            tracking = f"sqlite:///{folder}/mlflow.db"
            result = hpo.run(
                spec, n_trials=n_trials, storage=storage, tracking_uri=tracking, progress=False,
                workers=1,  # given: on a GPU, no workers or cohorts chosen (section 7 does)
            )  # fmt: skip
            study = optuna.load_study(study_name=spec["name"], storage=storage)
            done = [t for t in study.trials if t.datetime_complete and t.datetime_start]
            span = (
                max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
            ).total_seconds()
            book = result.summary.bookkeeping
            epochs_run = sum(len(t.intermediate_values) for t in done)
            row = {
                "dataset": name,
                "trials": len(done),
                "epochs": epochs_run,
                "span_s": span,
                "training_s": book["training_seconds"],
                "overhead_share": 1 - book["training_seconds"] / span,
                "trials_per_hour": len(done) / span * 3600,
                "best_value": result.summary.best_value,
                "steps_s": {k: book["seconds"][k] for k in STEPS},
            }
            out.append(row)
            print(
                f"overhead {name}: {row['overhead_share']:.1%} of the study's span outside "
                f"training, {row['trials_per_hour']:,.0f} trials an hour"
            )
    return out


def budget_section(device: str, **values) -> dict:
    """`search_spaces/mnist.yaml` as shipped (40 trials with its 3 baselines, then the refits,
    the ensemble and the test), through `hpo.run` on `device` with nothing else given, the
    machine sampled every second (MLflow's system metrics on the study's run). The GPU's
    busy share is the mean of NVML's utilisation samples (the share of each second a kernel
    ran) taken within the study's span. `values`: `hpo.run`'s overrides, for a smoke run."""
    import optuna
    from mlflow import MlflowClient

    import hpo

    spec = yaml.safe_load((ROOT / "search_spaces/mnist.yaml").read_text())
    spec["training"]["device"] = device
    env = {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started: dict = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            storage = f"sqlite:///{folder}/optuna.db"
            tracking = f"sqlite:///{folder}/mlflow.db"
            t0 = time.perf_counter()
            result = hpo.run(
                spec, storage=storage, tracking_uri=tracking, on_start=started.update, **values
            )
            wall = time.perf_counter() - t0
            study = optuna.load_study(study_name=spec["name"], storage=storage)
            done = [t for t in study.trials if t.datetime_complete and t.datetime_start]
            first = min(t.datetime_start for t in done).timestamp()
            last = max(t.datetime_complete for t in done).timestamp()
            client = MlflowClient(tracking)
            parent = result.summary.parent_run_id
            busy = []
            for gpu in range(8):
                samples = client.get_metric_history(
                    parent, f"system/gpu_{gpu}_utilization_percentage"
                )
                inside = [m.value for m in samples if first <= m.timestamp / 1e3 <= last]
                if inside:
                    busy.append(statistics.mean(inside) / 100)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary = result.summary
    row = {
        "plan": started.get("workers", ""),
        "fused_trials": started.get("fused_trials"),
        "trials": len(done),
        "wall_s": wall,
        "span_s": last - first,
        "gpu_busy": busy,
        "best_value": summary.best_value,
        "test_accuracy": summary.test_metrics.get("test_accuracy"),  # the best trial's
        "ensemble_test_accuracy": (summary.ensemble or {}).get("test_accuracy"),
    }
    print(
        f"budget: {row['trials']} trials, {row['wall_s']:.0f} s in all, span "
        f"{row['span_s']:.0f} s, GPU busy {', '.join(f'{b:.0%}' for b in busy) or 'not sampled'}"
        f", test accuracy {row['test_accuracy']} (ensemble {row['ensemble_test_accuracy']})"
    )
    return row


# ------------------------------------------------------------------ time to target


def _hpo(args: list, cwd: str, **kw) -> subprocess.Popen | None:
    cmd = [sys.executable, "-m", "hpo", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if kw.get("background"):
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"hpo {' '.join(map(str, args))} failed:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    return None


def hpo_time_to_target(
    device: str, target: float, cap: float, baselines: bool, fused: int, precision: str = "auto"
) -> dict:
    """Run mnist.yaml until a finished trial reaches `target` (then Ctrl-C it) or `cap` s."""
    import optuna

    with tempfile.TemporaryDirectory() as folder:
        spec = yaml.safe_load((ROOT / "search_spaces/mnist.yaml").read_text())
        if not baselines:
            spec["baselines"] = []
        spec["study"]["fused_trials"] = fused
        spec.setdefault("training", {})["precision"] = precision
        path = Path(folder) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        storage = f"sqlite:///{folder}/optuna.db"
        proc = _hpo(["run", path, "--device", device], folder, background=True)
        assert proc is not None
        launched = time.monotonic()
        reached, first_start, trials = None, None, 0
        try:
            while time.monotonic() - launched < cap + 60 and proc.poll() is None:
                time.sleep(1.0)
                try:
                    study = optuna.load_study(study_name=spec["name"], storage=storage)
                    all_trials = study.get_trials(deepcopy=False)
                except Exception:  # noqa: BLE001 - not created yet, or locked for a moment
                    continue
                starts = [t.datetime_start for t in all_trials if t.datetime_start]
                if not starts:
                    continue
                first_start = min(starts)
                trials = len(all_trials)
                hits = [
                    (t.datetime_complete - first_start).total_seconds()
                    for t in all_trials
                    if t.value is not None and t.value >= target and t.datetime_complete
                ]
                if hits:
                    reached = min(hits)
                    break
                if first_start and (time.time() - first_start.timestamp()) > cap:
                    break
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {"seconds_to_target": reached, "trials_started": trials}


def target_section(device: str, quick: bool, target: float = 0.98) -> list[dict]:
    import plain_optuna

    cap = QUICK_CAP_S if quick else FULL_CAP_S
    fused_k = 4 if device == "cpu" else 16
    rows = []
    # bf16 only where the device has bfloat16 units: emulated, it is many times slower.
    bf16 = bf16_native(torch.device(device))
    variants = [
        ("mnist.yaml (defaults: baselines first)", True, 1, "auto"),
        ("mnist.yaml without baselines", False, 1, "auto"),
        *([("mnist.yaml without baselines, precision bf16", False, 1, "bf16")] if bf16 else []),
        (f"mnist.yaml, fused_trials {fused_k}", True, fused_k, "auto"),
        (f"mnist.yaml without baselines, fused_trials {fused_k}", False, fused_k, "auto"),
    ]
    for name, baselines, fused, precision in variants:
        r = hpo_time_to_target(device, target, cap, baselines, fused, precision)
        rows.append({"variant": name, **r})
        print(f"time to {target}: {name}: {r['seconds_to_target']}")
    plain = plain_optuna.run(str(ROOT / "search_spaces/mnist.yaml"), cap, target, device=device)
    rows.append({"variant": "plain Optuna script (TPE, DataLoader, 10 epochs)", **plain})
    print(f"time to {target}: plain Optuna: {plain['seconds_to_target']}")
    return rows


# ------------------------------------------------------------------ report


def _s(v: float | None, cap: float) -> str:
    return f"{v:.0f} s" if v is not None else f"not within {cap:.0f} s"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def render(results: dict) -> str:
    r = results
    lines = [
        "# Benchmarks",
        "",
        f"Device: **{r['device']}**, torch {r['torch']}, {r['mode']} suite, {r['date']}. "
        "Every ratio compares two runs made one after the other in this run."
        + (
            ""
            if r.get("gpu")
            else " The GPU rows, section 7 (mnist.yaml's whole budget) among them, come from "
            "`make bench-gpu` on a machine with an NVIDIA GPU."
        ),
        "",
        "## 1. Trainer vs a plain DataLoader loop (one MNIST epoch, batch 512, Adam)",
        "",
        "Matrix-product peaks measured here, in every round just before its epochs "
        "(median over rounds): "
        + ", ".join(
            f"{p} {flops / 1e9:,.0f} GFLOP/s"
            for p, flops in r["trainer"].get("matmul_peaks", {"fp32": 0.0}).items()
        )
        + " sustained, the best over "
        + ", ".join("x".join(map(str, shape)) for shape in r["trainer"].get("peak_shapes", []))
        + f" of one shape's products run back to back for {PEAK_SECONDS} s; "
        + ", ".join(
            f"{p} {flops / 1e9:,.0f} GFLOP/s"
            for p, flops in r["trainer"].get("matmul_burst_peaks", {}).items()
        )
        + " burst, the single fastest product of those shapes. FLOPs counted as 6 x parameters "
        "per training sample; a loop's share is the median over rounds of its FLOP/s over that "
        "round's peak of the products it computes with (bf16: autocast, `training.precision: "
        "bf16`, measured only where the device has bfloat16 units).",
        "",
        "| net | loop | products | samples/s | share of peak | share of burst peak | speed-up |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = r["trainer"]["rows"]
    for row in rows:
        base = next(x for x in rows if x["arch"] == row["arch"] and x["loop"] == "DataLoader")
        lines.append(
            f"| {row['arch']} | {row['loop']} | {row.get('precision', 'fp32')} | "
            f"{row['samples_per_s']:,.0f} | "
            f"{row['fraction_of_peak']:.0%} | {row.get('fraction_of_burst_peak', 0.0):.0%} | "
            f"{row['samples_per_s'] / base['samples_per_s']:.2f}x |"
        )
    lines += [
        "",
        "## 2. Fused trials vs the same trials one after the other (one epoch each)",
        "",
        "Each round trains the K trials both ways; the ratio is the median of the rounds' "
        "ratios, the throughputs the medians of their times.",
        "",
        "| net | K | rounds | sequential samples/s | fused samples/s | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["fused"]:
        lines.append(
            f"| {row['arch']} | {row['k']} | {row.get('rounds', '')} | "
            f"{row['sequential_samples_per_s']:,.0f} | {row['fused_samples_per_s']:,.0f} | "
            f"{row['ratio']:.2f}x |"
        )
    lines += [
        "",
        "## 3. Platform overhead (the study's time outside training)",
        "",
        "Each study runs through `hpo.run` as a user runs it (one worker, the default): digits "
        "as `search_spaces/digits.yaml` ships (baselines, pruner, up to 40 epochs), MNIST a few "
        "trials of `mnist.yaml`'s space without pruning. Outside: the share of the study's span "
        "(the first trial asked to the last told) that its worker did not spend in epochs.",
        "",
        "| dataset | trials | epochs | span | training | outside | trials an hour | best |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["overhead"]:
        if "span_s" not in row:
            continue  # a JSON from before this table
        lines.append(
            f"| {row['dataset']} | {row['trials']} | {row['epochs']} | {row['span_s']:.1f} s | "
            f"{row['training_s']:.1f} s | {row['overhead_share']:.1%} | "
            f"{row['trials_per_hour']:,.0f} | {row['best_value']:.4f} |"
        )
    rows = [row for row in r["overhead"] if "steps_s" in row]
    if rows:
        lines += [
            "",
            "Where the driver's time went, in milliseconds a trial (the driver runs beside the "
            "worker, which holds its next trial and runs up to 4 short epochs ahead of the "
            "answers: the driver holds training up only when it falls further behind, or "
            "when a worker has no trial to start, `worker idle`):",
            "",
            "| step | " + " | ".join(row["dataset"] for row in rows) + " |",
            "| --- |" + " ---: |" * len(rows),
        ]
        for step in rows[0]["steps_s"]:
            lines.append(
                f"| {step} | "
                + " | ".join(f"{row['steps_s'][step] / row['trials'] * 1e3:.1f}" for row in rows)
                + " |"
            )
    cap = r["target_cap_s"]
    lines += [
        "",
        "## 4. Time to 98% MNIST validation accuracy (a finished trial at or above it)",
        "",
        "| run | seconds | trials started |",
        "| --- | ---: | ---: |",
    ]
    for row in r["target"]:
        lines.append(
            f"| {row['variant']} | {_s(row['seconds_to_target'], cap)} | "
            f"{row.get('trials_started', row.get('trials'))} |"
        )
    plain = r["target"][-1]["seconds_to_target"] if r["target"] else None
    ours = [x["seconds_to_target"] for x in r["target"][:-1] if x["seconds_to_target"]]
    best = min(ours, default=None)
    if plain and best:
        lines += ["", f"Fastest hpo variant vs the plain script: {plain / best:.1f}x sooner."]
    elif best and r["target"]:
        lines += [
            "",
            f"Fastest hpo variant vs the plain script: at least {cap / best:.1f}x sooner (the "
            f"plain script had not reached it when stopped at {cap:.0f} s).",
        ]
    if r["options"]:
        lines += [
            "",
            "## 5. What each option costs (one MNIST epoch of 784-512-512-10, batch 128)",
            "",
            "| option | epoch | against ReLU with Adam |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| {row['option']} | {row['epoch_s']:.3f} s | {row['ratio']:.2f}x |"
            for row in r["options"]
        ]
    if r.get("folds"):
        f = r["folds"]
        lines += [
            "",
            f"## 6. Five folds as one cohort ({f['config']}, a pool of {f['pool']:,} rows)",
            "",
            "Each with the torch threads a worker gives it (one for a small step, "
            "`hpo.executors.worker.threads_for`); medians of the rounds.",
            "",
            "| run | seconds | against one fold |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| {row['variant']} | {row['seconds']:.3f} | {row['x_one_fold']:.2f}x |"
            for row in f["rows"]
        ]
    if r.get("budget"):
        b = r["budget"]
        busy = ", ".join(f"{x:.0%}" for x in b["gpu_busy"]) or "not sampled"
        lines += [
            "",
            "## 7. mnist.yaml's whole budget (`hpo run search_spaces/mnist.yaml`, nothing else "
            "given)",
            "",
            f"Workers: {b['plan']}; up to {b['fused_trials']} trials fused a cohort.",
            "",
            "| trials | wall time | search span | GPU busy in the span | best val | test, best "
            "trial | test, ensemble |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {b['trials']} | {b['wall_s']:.1f} s | {b['span_s']:.1f} s | {busy} | "
            f"{b['best_value']:.4f} | {_acc(b['test_accuracy'])} | "
            f"{_acc(b['ensemble_test_accuracy'])} |",
        ]
    if r.get("seconds"):
        took = ", ".join(f"{name} {sec:.0f} s" for name, sec in r["seconds"].items())
        lines += ["", f"Wall time of each section: {took} ({sum(r['seconds'].values()):.0f} s)."]
    return "\n".join(lines) + "\n"


def write_docs(results: dict, page: Path = ROOT / "docs" / "performance.md") -> None:
    """Replace the page's section for this run's device kind (cpu or gpu) with its figures."""
    kind = "gpu" if results.get("gpu") else "cpu"
    begin, end = f"<!-- bench:{kind}:begin -->", f"<!-- bench:{kind}:end -->"
    text = page.read_text()
    head, _, rest = text.partition(begin)
    _, found, tail = rest.partition(end)
    if not found:
        raise SystemExit(f"{page}: no {begin} ... {end} section to write the figures into")
    body = render(results).split("\n", 2)[2]  # the page has its own title
    body = body.replace("\n## ", "\n### ")
    page.write_text(f"{head}{begin}\n{body}{end}{tail}")
    print(f"wrote the {kind} figures into {page}")


def main() -> None:
    flush_denormals()  # as hpo's processes do, before the first torch operation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="section 2's K")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["trainer", "fused", "overhead", "target", "options", "folds", "budget"],
        default=None,
    )
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="leave docs/performance.md alone (a full or quick run of every section writes it)",
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    gpu = torch.device(args.device).type == "cuda"
    device = (
        torch.cuda.get_device_name(args.device)
        if gpu
        else f"CPU, {torch.get_num_threads()} threads"
    )
    every = ["trainer", "fused", "overhead", "target", "options", "folds"]
    only = set(args.only or every + (["budget"] if gpu else []))  # 40 minutes on a CPU
    results: dict = {
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__,
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "target_cap_s": QUICK_CAP_S if args.quick else FULL_CAP_S,
        "trainer": {"matmul_peak_flops": 0.0, "rows": []},
        "fused": [],
        "overhead": [],
        "target": [],
        "options": [],
        "folds": {},
    }
    repeats = 1 if args.quick else 3
    ks = args.ks or ([1, 4, 8] if args.quick else [1, 4, 8, 16, 32] + ([64, 128] if gpu else []))
    sections = {
        "trainer": lambda: trainer_section(args.device, repeats),
        "fused": lambda: bench_fused.measure(args.device, ks, repeats),
        "overhead": lambda: overhead_section(args.device, args.quick),
        "target": lambda: target_section(args.device, args.quick),
        # quick: one warm-up epoch for all options, not one each
        "options": lambda: bench_options.measure(args.device, repeats, warm_all=not args.quick),
        "folds": lambda: bench_folds.measure(args.device, 3 if args.quick else 5),
        "budget": lambda: budget_section(args.device),
    }
    results["seconds"] = {}
    for name, section in sections.items():
        if name in only:
            t0 = time.perf_counter()
            results[name] = section()
            results["seconds"][name] = round(time.perf_counter() - t0, 1)
            print(f"section {name}: {results['seconds'][name]:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "benchmarks.md").write_text(render(results))
    print(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'}")
    if args.only is None and not args.no_docs:
        write_docs(results)


if __name__ == "__main__":
    main()
