"""The multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hpo.registry import ACTIVATIONS, INITS


def build_mlp(
    n_inputs: int,
    n_outputs: int,
    widths: Sequence[int] = (128, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    batchnorm: bool = False,
    init: str = "default",
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


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
