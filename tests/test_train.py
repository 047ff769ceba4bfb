"""The training loop on a few random tensors: no Optuna, no MLflow, no CLI."""

from __future__ import annotations

import math

import pytest
import torch

from hpo.model import build_mlp
from hpo.optim import add_l1_gradient, fast_step, make_optimizer
from hpo.registry import LR_SCHEDULES, OPTIMIZERS
from hpo.train import TrainConfig, evaluate, train


def fit(blobs, **kw):
    torch.manual_seed(0)
    model = build_mlp(8, 3, widths=[16])
    cfg = TrainConfig(**{"max_epochs": 10, "batch_size": 32, "lr": 1e-2, **kw})
    return model, train(model, blobs[0], blobs[1], cfg), cfg


def test_learns_separable_blobs(blobs):
    model, result, cfg = fit(blobs)
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"] / 2
    assert result.best["val_accuracy"] > 0.95
    assert set(first) >= {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"}


def test_kept_weights_are_the_best_epochs(blobs):
    model, result, cfg = fit(blobs, max_epochs=15, patience=3, lr=0.3, optimizer="sgd")
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1
    again = evaluate(model, blobs[1], cfg)
    assert again["loss"] == pytest.approx(result.best["val_loss"], rel=1e-5)


def test_early_stopping_stops_after_patience(blobs):
    # min_delta larger than any possible gain: no epoch after the first counts as better
    _, result, _ = fit(blobs, patience=2, min_delta=100.0)
    assert len(result.history) == 3 and result.best_epoch == 1 and result.stopped_early


def test_monitor_accuracy_is_maximised(blobs):
    _, result, _ = fit(blobs, monitor="val_accuracy", patience=20)
    accs = [h["val_accuracy"] for h in result.history]
    assert result.best["val_accuracy"] == max(accs)


def test_non_finite_loss_fails_with_reason(blobs):
    _, result, _ = fit(blobs, optimizer="sgd", lr=1e12)
    assert result.failure is not None and "became" in result.failure and "epoch" in result.failure


def test_a_diverged_trial_is_not_asked_about_the_epoch_it_diverged_in(blobs):
    torch.manual_seed(0)
    model = build_mlp(8, 3, widths=[16])
    cfg = TrainConfig(max_epochs=5, batch_size=32, optimizer="sgd", lr=1e12)
    seen = []
    result = train(model, *blobs, cfg, on_epoch_end=lambda e, m: seen.append(e))
    assert result.stopped_by == "diverged" and seen == list(range(1, len(result.history)))


def test_hook_sees_each_epoch_and_can_stop_training_keeping_its_history(blobs):
    seen = []

    def hook(epoch, metrics):
        seen.append((epoch, metrics["val_loss"]))
        return "pruned" if epoch == 2 else None

    model = build_mlp(8, 3, widths=[16])
    result = train(model, blobs[0], blobs[1], TrainConfig(max_epochs=5), on_epoch_end=hook)
    assert [e for e, _ in seen] == [1, 2]
    assert result.stopped_by == "pruned" and len(result.history) == 2
    assert [h["val_loss"] for h in result.history] == [v for _, v in seen]


def test_interrupt_flag_stops_at_the_next_step_and_drops_the_partial_epoch(blobs):
    import threading

    flag = threading.Event()

    def hook(epoch, metrics):
        if epoch == 2:
            flag.set()  # as a Ctrl-C handler in another thread would

    model = build_mlp(8, 3, widths=[16])
    cfg = TrainConfig(max_epochs=10)
    result = train(model, blobs[0], blobs[1], cfg, on_epoch_end=hook, interrupt=flag)
    assert result.stopped_by == "interrupted" and len(result.history) == 2


def test_stop_reasons_say_why_training_ended(blobs):
    _, ran_out, _ = fit(blobs, max_epochs=2, patience=50)
    _, early, _ = fit(blobs, patience=1, min_delta=100.0)
    _, diverged, _ = fit(blobs, optimizer="sgd", lr=1e12)
    assert ran_out.stopped_by == "max_epochs" and early.stopped_by == "early_stopping"
    assert diverged.stopped_by == "diverged" and diverged.failure


def test_same_seed_same_history(blobs):
    _, a, _ = fit(blobs, seed=3)
    _, b, _ = fit(blobs, seed=3)
    _, c, _ = fit(blobs, seed=4)
    strip = lambda r: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in r.history]  # noqa: E731
    assert strip(a) == strip(b) != strip(c)


def test_l1_shrinks_weights(blobs):
    plain, _, _ = fit(blobs)
    sparse, _, _ = fit(blobs, l1=1e-2)
    assert sparse[0].weight.abs().sum() < 0.7 * plain[0].weight.abs().sum()


def test_the_l1_gradient_is_autograds_for_the_penalty_in_the_loss():
    torch.manual_seed(0)
    model = build_mlp(8, 3, widths=[16, 16])
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    weights = [p for p in model.parameters() if p.dim() > 1]
    weights[0].data[0, :4] = 0.0  # |w| at 0: autograd's subgradient there is 0, as sign's
    l1 = 3e-3
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (loss + l1 * sum(w.abs().sum() for w in weights)).backward()
    expected = [w.grad.clone() for w in weights]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    add_l1_gradient(weights, l1)
    for w, want in zip(weights, expected, strict=True):
        torch.testing.assert_close(w.grad, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names)
@pytest.mark.parametrize("schedule", LR_SCHEDULES.names)
def test_every_optimizer_and_schedule_learns(blobs, optimizer, schedule):
    lr = {"sgd": 0.1, "adagrad": 0.1}.get(optimizer, 1e-2)
    _, result, _ = fit(
        blobs,
        optimizer=optimizer,
        lr=lr,
        lr_schedule=schedule,
        momentum=0.9,
        nesterov=True,
        grad_clip=1.0,
        weight_decay=1e-4,
    )
    assert result.failure is None and result.best["val_accuracy"] > 0.9
    if schedule == "cosine":
        assert result.history[-1]["lr"] < lr


def test_each_optimizer_gets_the_settings_it_takes():
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    group = make_optimizer(list(model.parameters()), cfg).param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.05, 0.9, True)
    assert group["weight_decay"] == 1e-3
    params = list(model.parameters())
    no_momentum = make_optimizer(params, TrainConfig(optimizer="sgd", nesterov=True))
    assert no_momentum.param_groups[0]["nesterov"] is False  # torch refuses it without momentum
    rms = make_optimizer(params, TrainConfig(optimizer="rmsprop", momentum=0.5))
    assert rms.param_groups[0]["momentum"] == 0.5
    adam = make_optimizer(params, TrainConfig(optimizer="adam", lr=0.01, momentum=0.9))
    assert isinstance(adam, torch.optim.Adam) and "momentum" not in adam.param_groups[0]


@pytest.mark.parametrize(
    "optimizer, settings",
    [
        ("adam", {}),
        ("adamw", {}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("sgd", {}),
        ("adagrad", {}),
    ],
)
def test_the_fast_step_is_the_optimizers_own(optimizer, settings):
    """On a CPU a fused optimizer steps through torch's functional form after its first step:
    the same parameters and state, bit for bit, as its own `step`."""
    torch.manual_seed(0)
    a, b = build_mlp(20, 3, [16]), build_mlp(20, 3, [16])
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(optimizer=optimizer, weight_decay=0.01, lr=1e-2, **settings)
    opt_a, opt_b = (
        make_optimizer(list(a.parameters()), cfg),
        make_optimizer(list(b.parameters()), cfg),
    )
    step = fast_step(opt_b)
    assert step != opt_b.step
    for i in range(5):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if i == 3:  # a schedule changing the rate between steps
            opt_a.param_groups[0]["lr"] = opt_b.param_groups[0]["lr"] = 5e-3
        opt_a.step()
        step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def test_optimizers_without_a_fused_kernel_step_as_they_are():
    params = list(build_mlp(4, 2, [3]).parameters())
    opt = make_optimizer(params, TrainConfig(optimizer="rmsprop", momentum=0.9))
    assert fast_step(opt) == opt.step


def test_regression_reports_rmse_in_target_units():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 4, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0])
    model = build_mlp(4, 1, widths=[16])
    cfg = TrainConfig(task="regression", max_epochs=30, lr=1e-2, y_scale=10.0, batch_size=32)
    result = train(model, (X[:300], y[:300]), (X[300:], y[300:]), cfg)
    best = result.best
    assert best["val_rmse"] == pytest.approx(math.sqrt(best["val_loss"]) * 10.0)
    assert best["val_loss"] < 0.1


def test_batchnorm_with_a_last_batch_of_one_row(blobs):
    (X, y), val = blobs
    model = build_mlp(8, 3, widths=[16], batchnorm=True)
    result = train(model, (X[:65], y[:65]), val, TrainConfig(max_epochs=2, batch_size=32))
    assert result.failure is None and len(result.history) == 2


def test_bf16_precision_computes_products_in_bfloat16_and_keeps_float32_weights(blobs):
    seen = []

    def record(module, inputs, output):
        seen.append(output.dtype)

    runs = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        torch.manual_seed(0)
        model = build_mlp(8, 3, widths=[16])
        model[0].register_forward_hook(record)
        cfg = TrainConfig(max_epochs=5, batch_size=32, lr=1e-2, precision=precision)
        runs[precision] = train(model, blobs[0], blobs[1], cfg)
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    fp32, bf16 = (runs[p].history for p in ("fp32", "bf16"))
    assert [h["train_loss"] for h in fp32] != [h["train_loss"] for h in bf16]
    assert bf16[-1]["val_accuracy"] > 0.95
    assert abs(bf16[-1]["val_loss"] - fp32[-1]["val_loss"]) < 0.05


def test_tf32_is_set_for_cuda_training_only_while_it_lasts():
    """The switch is process-wide: a study's precision must not leak into the caller's code.
    (Setting it needs no GPU, so this runs on any machine.)"""
    from hpo.train import products, resolved_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [resolved_precision(p, cuda) for p in ("auto", "fp32", "tf32", "bf16")] == [
        "tf32",
        "fp32",
        "tf32",
        "bf16",
    ]
    assert [resolved_precision(p, cpu) for p in ("auto", "fp32", "tf32", "bf16")] == [
        "fp32",
        "fp32",
        "fp32",
        "bf16",
    ]
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.get_float32_matmul_precision()
    with products("auto", cuda):
        assert matmul.fp32_precision == "tf32"
        # torch's legacy switch agrees: reading it raises when the two were set apart
        assert torch.get_float32_matmul_precision() == "high" and matmul.allow_tf32
        with products("fp32", cuda):
            assert matmul.fp32_precision == "ieee"
            assert torch.get_float32_matmul_precision() == "highest"
        assert matmul.fp32_precision == "tf32"
    assert (matmul.fp32_precision, torch.get_float32_matmul_precision()) == before
    assert not matmul.allow_tf32


def test_unknown_precision_is_refused(blobs):
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, tf32, bf16"):
        fit(blobs, precision="fp16")


DENORMALS = """
import torch
from torch.nn import functional as F
torch.randn(2048, 2048) @ torch.randn(2048, 2048)  # worker threads started before hpo loads
from hpo.model import build_mlp
from hpo.train import TrainConfig, denormals_flushed, train
seen = []
X, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
train(build_mlp(8, 2, [16]), (X, y), (X, y), TrainConfig(max_epochs=1),
      on_epoch_end=lambda epoch, metrics: seen.append(denormals_flushed()))
print(denormals_flushed(), seen)
"""


def test_training_flushes_denormals_on_worker_threads_started_before_it():
    """Denormal floats are tens of times slower on x86: training moves to a thread whose
    intra-op workers flush them when the caller's workers were started without flushing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # intra-op worker threads, whatever the suite's
    out = subprocess.run(
        [sys.executable, "-c", DENORMALS], capture_output=True, text=True, check=True, env=env
    ).stdout.split(maxsplit=1)
    caller_flushes, in_training = out[0] == "True", out[1].strip()
    assert in_training == "[True]", (caller_flushes, in_training)


def test_a_product_of_denormals_is_zero_only_when_flushed():
    """Each check in a fresh thread, whose intra-op workers start with its mode."""
    import threading

    from hpo.train import denormals_flushed

    def in_thread(flush):
        out = []

        def run():
            torch.set_flush_denormal(flush)
            out.append(denormals_flushed())

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return out[0]

    assert in_thread(False) is False
    assert in_thread(True) is True
