"""The written-out backward pass against autograd's, and the trainer's direct Adam step against
the optimizer's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hpo.train
from hpo.backprop import manual_step
from hpo.model import build_mlp, train_forward
from hpo.registry import ACTIVATIONS
from hpo.train import TrainConfig, make_optimizer, optimizer_step, train

TIGHT = {"rtol": 1e-5, "atol": 1e-7}  # a few float32 roundings


def twins(activation: str, batchnorm: bool, dropout: float, outputs: int):
    torch.manual_seed(1)
    a = build_mlp(20, outputs, [16, 8], activation, dropout, batchnorm)
    b = build_mlp(20, outputs, [16, 8], activation, dropout, batchnorm)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # off their initial values, so that biases and slopes matter
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return a.train(), b.train()


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_written_out_step_gives_autograds_loss_gradients_and_running_stats(
    activation, batchnorm, dropout, task
):
    auto, written = twins(activation, batchnorm, dropout, 3 if task == "classification" else 1)
    x = torch.randn(32, 20)
    y = torch.randint(0, 3, (32,)) if task == "classification" else torch.randn(32)

    torch.manual_seed(5)  # the same dropout masks for both
    out = train_forward(auto, x)
    loss = F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out.squeeze(1), y)
    loss.backward()
    step = manual_step(written, task, "fp32")
    assert step is not None
    torch.manual_seed(5)
    loss2, out2 = step(x, y)

    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)  # the same kernels
    torch.testing.assert_close(loss2, loss.detach(), **TIGHT)
    for (name, p), q in zip(auto.named_parameters(), written.parameters(), strict=True):
        assert q.grad is not None and q.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, **TIGHT, msg=name)
    for (name, b), c in zip(auto.named_buffers(), written.buffers(), strict=True):
        assert torch.equal(b, c), name  # batch norm's running statistics and batch count


def test_the_step_writes_each_gradient_in_place_and_overwrites_it():
    _, model = twins("relu", False, 0.0, 3)
    step = manual_step(model, "classification", "fp32")
    grads = [p.grad for p in model.parameters()]
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    step(x, y)
    first = [g.clone() for g in grads]
    step(x, y)  # the same batch and weights: the same gradients, not twice them
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    for g, f in zip(grads, first, strict=True):
        torch.testing.assert_close(g, f, rtol=0, atol=0)


def test_autograd_keeps_what_the_written_out_step_does_not_cover():
    model = build_mlp(20, 3, [16])
    assert manual_step(model, "classification", "bf16") is None
    assert manual_step(model.double(), "classification", "fp32") is None
    odd = nn.Sequential(nn.Linear(20, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    assert manual_step(odd, "classification", "fp32") is None
    no_bias = nn.Sequential(nn.Linear(20, 3, bias=False))
    assert manual_step(no_bias, "classification", "fp32") is None


@pytest.mark.parametrize(
    "settings",
    [
        {"activation": "gelu", "dropout": 0.2, "optimizer": "adam", "l1": 1e-4, "grad_clip": 1.0},
        # Not Adam: the bias before a batch norm has a gradient of zero plus rounding, which
        # Adam's first step turns into +-lr whichever way the rounding went.
        {"activation": "tanh", "batchnorm": True, "optimizer": "sgd", "momentum": 0.9},
    ],
)
def test_training_with_it_follows_autograds_curve(blobs, monkeypatch, settings):
    settings = dict(settings)
    net = {k: settings.pop(k) for k in ("activation", "dropout", "batchnorm") if k in settings}

    def fit():
        torch.manual_seed(0)
        model = build_mlp(8, 3, [32, 16], **net)
        cfg = TrainConfig(max_epochs=6, batch_size=32, lr=1e-2, **settings)
        return train(model, blobs[0], blobs[1], cfg).history

    written = fit()
    monkeypatch.setattr(hpo.train, "manual_step", lambda *a: None)
    auto = fit()
    for w, a in zip(written, auto, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert w[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert written[-1]["val_loss"] < written[0]["val_loss"]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_direct_adam_step_is_the_optimizers_own(optimizer):
    torch.manual_seed(0)
    a, b = build_mlp(20, 3, [16]), build_mlp(20, 3, [16])
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(optimizer=optimizer, weight_decay=0.01, lr=1e-2)
    opt_a, opt_b = make_optimizer(a, cfg), make_optimizer(b, cfg)
    step = optimizer_step(opt_b)
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
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


def test_other_optimizers_step_as_they_are():
    opt = make_optimizer(build_mlp(4, 2, [3]), TrainConfig(optimizer="sgd", momentum=0.9))
    assert optimizer_step(opt) == opt.step
