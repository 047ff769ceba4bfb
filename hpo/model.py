"""The multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hpo.params import PARAMS
from hpo.registry import ACTIVATIONS, INITS


def build_mlp(
    n_inputs: int,
    n_outputs: int,
    widths: Sequence[int] = (PARAMS["width"].default,) * PARAMS["n_layers"].default,
    activation: str = PARAMS["activation"].default,
    dropout: float = PARAMS["dropout"].default,
    batchnorm: bool = PARAMS["batchnorm"].default,
    init: str = PARAMS["init"].default,
) -> nn.Sequential:
    """Hidden blocks Linear -> [BatchNorm] -> activation -> [Dropout], then a linear head.

    No hidden layers gives a linear (or logistic) model. SELU gets alpha dropout so that its
    self-normalising property survives.
    """
    for reg, name in ((ACTIVATIONS, activation), (INITS, init)):
        if name not in reg:
            raise ValueError(f"{reg.what} must be one of {', '.join(reg)}, got {name!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    fan_in = n_inputs
    for width in widths:
        layers.append(nn.Linear(fan_in, int(width)))
        if batchnorm:
            layers.append(nn.BatchNorm1d(int(width)))
        layers.append(ACTIVATIONS.load(activation)())
        if dropout > 0:
            layers.append(
                nn.AlphaDropout(dropout) if activation == "selu" else nn.Dropout(dropout)
            )
        fan_in = int(width)
    layers.append(nn.Linear(fan_in, n_outputs))
    model = nn.Sequential(*layers)
    INITS.load(init)([m for m in model if isinstance(m, nn.Linear)], activation)
    return model


def init_default(linears: list[nn.Linear], activation: str) -> None:
    """PyTorch's own initialisation: Kaiming uniform with a=sqrt(5), left as it is."""


def init_he(linears: list[nn.Linear], activation: str) -> None:
    """He (Kaiming) normal on hidden layers, zero biases; the head keeps unit gain."""
    nonlin = "leaky_relu" if activation in ("leaky_relu", "prelu") else "relu"
    for i, lin in enumerate(linears):
        hidden = i < len(linears) - 1
        nn.init.kaiming_normal_(lin.weight, nonlinearity=nonlin if hidden else "linear")
        nn.init.zeros_(lin.bias)


def init_xavier(linears: list[nn.Linear], activation: str) -> None:
    """Xavier (Glorot) uniform with the activation's gain on hidden layers, zero biases."""
    gain_for = activation if activation in ("tanh", "sigmoid", "relu", "selu") else "linear"
    for i, lin in enumerate(linears):
        hidden = i < len(linears) - 1
        nn.init.xavier_uniform_(
            lin.weight, gain=nn.init.calculate_gain(gain_for) if hidden else 1.0
        )
        nn.init.zeros_(lin.bias)


BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # nn.BatchNorm1d's defaults
ALPHA_DROPOUT = 1.7580993408473766  # SELU's -alpha' (torch's alpha_dropout)
RATE_STEPS = 1 << 16  # a dropout rate is applied to the nearest 1/65536


def keep_mask(
    shape: torch.Size, rate: float | torch.Tensor, device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """A dropout mask: True where an element is kept, with probability 1 - `rate` (a float,
    or a tensor that broadcasts against `shape`, one rate per member of a stack).

    Each element takes 16 bits of one 64-bit random word, compared with the rate scaled to
    16 bits: a quarter of the random draws of `bernoulli_`, and a third of its time on a CPU.
    """
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # all 64 bits (the default skips one)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    if isinstance(rate, torch.Tensor):
        threshold = (rate * RATE_STEPS).round().to(torch.int32) - RATE_STEPS // 2
    else:
        threshold = round(rate * RATE_STEPS) - RATE_STEPS // 2
    return bits >= threshold


def dropout(
    h: torch.Tensor, rate: float | torch.Tensor, alpha: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Inverted dropout of `h` at `rate` in training (`nn.Dropout`'s), or alpha dropout
    (`nn.AlphaDropout`'s, which keeps SELU's mean and variance), with `keep_mask`'s masks."""
    return apply_mask(h, keep_mask(h.shape, rate, h.device, generator), rate, alpha)


def apply_mask(
    h: torch.Tensor, keep: torch.Tensor, rate: float | torch.Tensor, alpha: bool
) -> torch.Tensor:
    """`h` with dropout's mask `keep` applied at `rate`, scaled as `dropout` says."""
    if alpha:
        a = _alpha_scale(rate)
        return torch.where(keep, h, -ALPHA_DROPOUT) * a + ALPHA_DROPOUT * a * rate
    return h * mask_gradient(keep, rate, alpha, h.dtype)


def mask_gradient(
    keep: torch.Tensor, rate: float | torch.Tensor, alpha: bool, dtype: torch.dtype
) -> torch.Tensor:
    """What `apply_mask` multiplies its input's gradient by: the scaled mask."""
    if alpha:
        return keep.to(dtype).mul_(_alpha_scale(rate))
    return keep.to(dtype).div_(1 - rate)


def _alpha_scale(rate: float | torch.Tensor) -> float | torch.Tensor:
    return ((ALPHA_DROPOUT**2 * rate + 1) * (1 - rate)) ** -0.5


def train_forward(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` in training mode, its dropout layers drawing their masks with `dropout`
    (`nn.Dropout`'s `bernoulli_` costs about as much as the layer's own products on a CPU).
    The model keeps its `nn.Dropout` modules: a saved model needs nothing from hpo."""
    for module in model:
        if isinstance(module, nn.Dropout | nn.AlphaDropout) and module.training and module.p:
            x = dropout(x, module.p, alpha=isinstance(module, nn.AlphaDropout))
        else:
            x = module(x)
    return x


@dataclass
class _StackedLayer:
    """One hidden or output layer of the stack: which tensors it holds."""

    linear: int  # index of its weight in the parameter list (its bias is the next one)
    bn: int | None = None  # index of its batch norm's weight (bias next), if any
    prelu: int | None = None  # index of its PReLU slope, if any
    dropout: bool = False


class StackedMLP:
    """Several MLPs of one shape (from `build_mlp`) as one: their tensors stacked along a
    leading member dimension, run together by `forward` on one batch shared by all."""

    def __init__(self, models: list[nn.Sequential]):
        # Tensors are matched by their role, not their name: a member without dropout has no
        # Dropout modules, so its layers sit at other indices than a member with it.
        layouts = [_layout(m) for m in models]
        self.names = [layout.names for layout in layouts]  # per member, in role order
        self.buffer_names = [layout.buffers for layout in layouts]
        self.owner = list(range(len(models)))  # the member of each row of the stack
        self.params = [
            torch.stack([dict(m.named_parameters())[names[j]].detach() for m, names in
                         zip(models, self.names, strict=True)]).clone().requires_grad_(True)
            for j in range(len(self.names[0]))
        ]  # fmt: skip
        self.buffers = [
            torch.stack([dict(m.named_buffers())[names[j]] for m, names in
                         zip(models, self.buffer_names, strict=True)]).clone()
            for j in range(len(self.buffer_names[0]))
        ]  # fmt: skip
        # The members share their activation (it shapes the step): the first one's module,
        # which holds no parameters but PReLU's, whose slopes are stacked like the others.
        self.act = layouts[0].activation
        self.alpha = any(layout.alpha for layout in layouts)  # SELU's alpha dropout
        self.layers = layouts[0].layers
        for layout in layouts[1:]:  # dropout where any member has it (rate 0 is a no-op)
            for mine, theirs in zip(self.layers, layout.layers, strict=True):
                mine.dropout = mine.dropout or theirs.dropout
        self.rates = torch.tensor(
            [layout.rate for layout in layouts], dtype=self.params[0].dtype,
            device=self.params[0].device,
        )  # fmt: skip
        self.host_rates = [layout.rate for layout in layouts]
        self.bn_buffers = {  # batch norm weight index -> (running mean, running var) indices
            layer.bn: (2 * n, 2 * n + 1)
            for n, layer in enumerate(x for x in self.layers if x.bn is not None)
        }

    def forward(
        self, x: torch.Tensor, gen: torch.Generator | None, training: bool
    ) -> torch.Tensor:
        """(rows, features) shared, or (members, rows, features) each member's own ->
        (members, rows, outputs); in training, each member's dropout at its own rate, its
        masks drawn from `gen`."""
        drop = training and any(self.host_rates)
        k = self.params[0].shape[0]
        h: torch.Tensor | None = None
        for n, layer in enumerate(self.layers):
            w, b = self.params[layer.linear], self.params[layer.linear + 1]
            if h is None and x.dim() == 3:  # each member's own rows
                h = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            elif h is None:  # the shared batch times every member's first layer, in one product
                out = w.shape[1]
                h = torch.addmm(b.reshape(-1), x, w.reshape(k * out, -1).t())
                h = h.view(len(x), k, out).transpose(0, 1)
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if n == len(self.layers) - 1:
                return h
            if layer.bn is not None:
                h = self._batchnorm(h, layer.bn, training)
            if layer.prelu is None:
                h = self.act(h)
            else:
                slope = self.params[layer.prelu].view(k, 1, -1)
                h = torch.where(h >= 0, h, slope * h)
            if layer.dropout and drop:
                h = dropout(h, self.rates.view(-1, 1, 1), self.alpha, gen)
        assert h is not None
        return h

    def _batchnorm(self, h: torch.Tensor, at: int, training: bool) -> torch.Tensor:
        weight, bias = self.params[at], self.params[at + 1]
        mean_i, var_i = self.bn_buffers[at]
        running_mean, running_var = self.buffers[mean_i], self.buffers[var_i]
        if training:
            # In float32 at least, as nn.BatchNorm1d keeps them, under bf16 autocast too (where
            # h comes out of the products in bfloat16, and the running buffers take only float32).
            stats = h.to(torch.promote_types(h.dtype, torch.float32))
            mean = stats.mean(1)
            var = stats.var(1, unbiased=False)
            with torch.no_grad():
                rows = h.shape[1]
                running_mean.lerp_(mean.detach(), BN_MOMENTUM)
                running_var.lerp_(var.detach() * rows / max(rows - 1, 1), BN_MOMENTUM)
        else:
            mean, var = running_mean, running_var
        scale = weight * torch.rsqrt(var + BN_EPS)
        return h * scale.unsqueeze(1) + (bias - mean * scale).unsqueeze(1)

    def weights(self) -> list[torch.Tensor]:
        """The linear layers' weights (L1 skips biases)."""
        return [self.params[layer.linear] for layer in self.layers]

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        """The state dict (parameters and buffers) of the member at `row`, as copies, with
        the names its own `nn.Sequential` uses."""
        member = self.owner[row]
        names, buffers = self.names[member], self.buffer_names[member]
        state = {n: p[row].detach().clone() for n, p in zip(names, self.params, strict=True)}
        state |= {n: b[row].clone() for n, b in zip(buffers, self.buffers, strict=True)}
        return state

    def keep(self, rows: torch.Tensor) -> None:
        """Only the members at `rows` stay in the stack."""
        self.params = [p.detach().index_select(0, rows).requires_grad_(True) for p in self.params]
        self.buffers = [b.index_select(0, rows) for b in self.buffers]
        self.rates = self.rates.index_select(0, rows)
        kept = rows.tolist()
        self.owner = [self.owner[r] for r in kept]
        self.host_rates = [self.host_rates[r] for r in kept]


@dataclass
class _Layout:
    """A `build_mlp` model's parameter and buffer names in role order (each layer's weight,
    bias, then its batch norm's weight and bias, then its PReLU slope), its layers, its
    activation module and its dropout."""

    names: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    layers: list[_StackedLayer] = field(default_factory=list)
    activation: nn.Module = field(default_factory=nn.Identity)
    rate: float = 0.0
    alpha: bool = False


def _layout(model: nn.Sequential) -> _Layout:
    out = _Layout()
    for i, module in enumerate(model):
        if isinstance(module, nn.Linear):
            out.layers.append(_StackedLayer(len(out.names)))
            out.names += [f"{i}.weight", f"{i}.bias"]
        elif isinstance(module, nn.BatchNorm1d):
            out.layers[-1].bn = len(out.names)
            out.names += [f"{i}.weight", f"{i}.bias"]
            out.buffers += [f"{i}.running_mean", f"{i}.running_var"]
        elif isinstance(module, nn.Dropout | nn.AlphaDropout):
            out.layers[-1].dropout = True
            out.rate, out.alpha = float(module.p), isinstance(module, nn.AlphaDropout)
        else:
            if isinstance(module, nn.PReLU):
                out.layers[-1].prelu = len(out.names)
                out.names.append(f"{i}.weight")
            out.activation = module
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
