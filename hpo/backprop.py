"""A training step for `build_mlp`'s models with the backward pass written out.

Autograd records a graph node per operation of every step, then walks it back; for an MLP the
walk is always the same, so it is written here layer by layer with the ATen backward kernels
autograd itself calls, and the same gradients come out (to the bit, but for the loss's, which
is summed in another order). What goes is the graph's cost, reallocating every gradient each
step (they are written in place), and a log-softmax along 10 classes (see `_cross_entropy`):
784-64-64-10 at batch 512 trains 12-16% faster a step on a 2-core CPU, 784-512-512-10 4-7%.

The trainer uses it for float32 products on a CPU, where it was measured; bf16 autocast and
CUDA keep autograd (`manual_step` returns None for them, and for any model it cannot take).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hpo.model import apply_mask, keep_mask, mask_gradient

aten = torch.ops.aten

# (input rows, targets) -> (the batch's mean loss, the model's output), gradients written to
# the parameters' .grad.
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805  # torch.nn.SELU's constants


class _Linear:
    def __init__(self, module: nn.Linear, first: bool):
        self.w, self.b, self.first = module.weight, module.bias, first
        self.h: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.h = h
        return torch.addmm(self.b, h, self.w.t())

    def backward(self, g: torch.Tensor) -> torch.Tensor | None:
        torch.mm(g.t(), self.h, out=self.w.grad)  # what autograd computes for W.t()'s grad
        torch.sum(g, 0, out=self.b.grad)
        return None if self.first else g.mm(self.w)  # the input's gradient is never needed


class _Activation:
    """An elementwise activation: its module's forward, and the ATen kernel autograd uses for
    its backward, given the gradient, the activation's input z and its output."""

    BACKWARD: dict[
        type, Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    ] = {
        # In place: g is the step's own (a Linear's or dropout's backward made it), and so is
        # z, which the forward pass overwrites with its output.
        nn.ReLU: lambda m, g, z, out: aten.threshold_backward.grad_input(g, out, 0, grad_input=g),
        nn.LeakyReLU: lambda m, g, z, out: aten.leaky_relu_backward(g, z, m.negative_slope, False),
        nn.ELU: lambda m, g, z, out: aten.elu_backward(g, m.alpha, 1, 1, False, z),
        nn.SELU: lambda m, g, z, out: aten.elu_backward(g, SELU_ALPHA, SELU_SCALE, 1, False, z),
        nn.GELU: lambda m, g, z, out: aten.gelu_backward(g, z, approximate=m.approximate),
        nn.SiLU: lambda m, g, z, out: aten.silu_backward(g, z),
        nn.Tanh: lambda m, g, z, out: aten.tanh_backward(g, out),
        nn.Sigmoid: lambda m, g, z, out: aten.sigmoid_backward(g, out),
    }

    def __init__(self, module: nn.Module):
        self.module, self.grad = module, self.BACKWARD[type(module)]
        self.relu = type(module) is nn.ReLU
        self.z = self.out = torch.empty(0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.z, self.out = z, z.relu_() if self.relu else self.module(z)
        return self.out

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        return self.grad(self.module, g, self.z, self.out)


class _PReLU:
    """PReLU with one slope per layer, as `build_mlp` makes it."""

    def __init__(self, module: nn.PReLU):
        self.w = module.weight
        self.z = torch.empty(0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.z = z
        return F.prelu(z, self.w)

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        g_in, g_w = aten._prelu_kernel_backward(g, self.z, self.w)
        torch.sum(g_w, (0, 1), keepdim=True, out=self.w.grad.view(1, 1))  # g_w is per element
        return g_in


class _Dropout:
    """hpo's dropout (`model.dropout`): inverted, or alpha dropout after SELU."""

    def __init__(self, module: nn.Dropout | nn.AlphaDropout):
        self.rate, self.alpha = module.p, isinstance(module, nn.AlphaDropout)
        self.grad = torch.empty(0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        keep = keep_mask(h.shape, self.rate, h.device)
        self.grad = mask_gradient(keep, self.rate, self.alpha, h.dtype)
        return apply_mask(h, keep, self.rate, True) if self.alpha else h * self.grad

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        return g * self.grad


class _BatchNorm:
    """Batch norm in training: the batch's statistics, the running ones updated in place."""

    def __init__(self, module: nn.BatchNorm1d):
        self.m = module
        self.saved: tuple[torch.Tensor, ...] = ()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.m
        assert m.num_batches_tracked is not None and m.momentum is not None
        m.num_batches_tracked.add_(1)
        out, mean, invstd = aten.native_batch_norm(
            z, m.weight, m.bias, m.running_mean, m.running_var, True, m.momentum, m.eps
        )
        self.saved = (z, mean, invstd)
        return out

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        m = self.m
        z, mean, invstd = self.saved
        g_in, g_w, g_b = aten.native_batch_norm_backward(
            g, z, m.weight, m.running_mean, m.running_var, mean, invstd, True, m.eps,
            [True, True, True],
        )  # fmt: skip
        m.weight.grad.copy_(g_w)
        m.bias.grad.copy_(g_b)
        return g_in


def _layer(module: nn.Module, first: bool):
    if isinstance(module, nn.Linear) and module.bias is not None:
        return _Linear(module, first)
    if type(module) in _Activation.BACKWARD:
        return _Activation(module)
    if isinstance(module, nn.PReLU) and module.weight.numel() == 1:
        return _PReLU(module)
    if isinstance(module, nn.Dropout | nn.AlphaDropout):
        return _Dropout(module) if module.p > 0 else None
    if (
        isinstance(module, nn.BatchNorm1d)
        and module.affine
        and module.track_running_stats
        and module.momentum is not None
    ):
        return _BatchNorm(module)
    raise TypeError(f"no written-out backward for {type(module).__name__}")


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy's mean loss and its gradient, (softmax - one-hot) / rows, computed
    on the outputs transposed: a log-softmax along 10 contiguous classes costs 35 us at 512
    rows on a CPU, along 512 contiguous rows 3.5 (a step of 784-64-64-10 is about 1.2 ms)."""
    rows = len(out)
    logp = torch.log_softmax(out.t().contiguous(), 0)
    targets = y.view(1, -1)
    loss = logp.gather(0, targets).mean().neg()
    g = logp.exp_()
    g.scatter_add_(0, targets, torch.full((1, rows), -1.0, device=out.device)).div_(rows)
    return loss, g.t()


def manual_step(model: nn.Module, task: str, precision: str) -> Step | None:
    """A training step for `model` (a `build_mlp` model) with `task`'s loss, or None where
    autograd has to do it: products other than float32 on a CPU, or a layer not covered."""
    params = list(model.parameters())
    if (
        precision != "fp32"
        or not isinstance(model, nn.Sequential)
        or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params)
    ):
        return None
    try:
        layers = [_layer(m, first=i == 0) for i, m in enumerate(model)]
    except TypeError:
        return None
    layers = [layer for layer in layers if layer is not None]
    for p in params:  # written in place every step
        p.grad = torch.zeros_like(p)
    one = torch.ones(())
    classify = task == "classification"

    @torch.no_grad()
    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for layer in layers:
            h = layer.forward(h)
        if classify:
            loss, g = _cross_entropy(h, y)
        else:
            pred = h.squeeze(1)
            loss = F.mse_loss(pred, y)
            g = aten.mse_loss_backward(one, pred, y, 1).unsqueeze(1)
        for layer in reversed(layers):
            g = layer.backward(g)
        return loss, h

    return step
