"""The multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01
    "prelu": nn.PReLU,  # learned slope, one per layer
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    fan_in = n_inputs
    for width in widths:
        layers.append(nn.Linear(fan_in, int(width)))
        if batchnorm:
            layers.append(nn.BatchNorm1d(int(width)))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(
                nn.AlphaDropout(dropout) if activation == "selu" else nn.Dropout(dropout)
            )
        fan_in = int(width)
    layers.append(nn.Linear(fan_in, n_outputs))
    model = nn.Sequential(*layers)
    _initialise(model, activation, init)
    return model


def _initialise(model: nn.Sequential, activation: str, init: str) -> None:
    if init == "default":
        return  # PyTorch's own: Kaiming-uniform with a=sqrt(5)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        hidden = i < len(linears) - 1
        if init == "he":
            nonlin = "leaky_relu" if activation in ("leaky_relu", "prelu") else "relu"
            nn.init.kaiming_normal_(lin.weight, nonlinearity=nonlin if hidden else "linear")
        elif init == "xavier":
            gain_for = (
                activation if activation in ("tanh", "sigmoid", "relu", "selu") else "linear"
            )
            nn.init.xavier_uniform_(
                lin.weight, gain=nn.init.calculate_gain(gain_for) if hidden else 1.0
            )
        else:
            raise ValueError(f"init must be default, he or xavier, got {init!r}")
        nn.init.zeros_(lin.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
