"""build_mlp: structure, activations, dropout, batch norm, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpo.model import build_mlp, count_parameters
from hpo.registry import ACTIVATIONS


def test_zero_hidden_layers_is_a_linear_model():
    model = build_mlp(10, 3, widths=[])
    assert [type(m) for m in model] == [nn.Linear]
    assert count_parameters(model) == 10 * 3 + 3


def test_block_order_and_per_layer_widths():
    model = build_mlp(10, 3, widths=[32, 16], activation="elu", dropout=0.2, batchnorm=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "ELU", "Dropout"] * 2 + ["Linear"]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 3]
    assert model(torch.randn(5, 10)).shape == (5, 3)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation_builds_and_runs(name):
    model = build_mlp(4, 2, widths=[8], activation=name)
    assert isinstance(model[1], ACTIVATIONS.load(name))
    assert torch.isfinite(model(torch.randn(3, 4))).all()


def test_selu_gets_alpha_dropout():
    model = build_mlp(4, 2, widths=[8], activation="selu", dropout=0.1)
    assert isinstance(model[2], nn.AlphaDropout)


def test_he_init_matches_kaiming_std_and_zero_bias():
    torch.manual_seed(0)
    model = build_mlp(1000, 2, widths=[1000], init="he")
    w = model[0].weight
    assert abs(w.std().item() - (2 / 1000) ** 0.5) < 0.002
    assert torch.count_nonzero(model[0].bias) == 0


def test_xavier_init_std_for_tanh():
    torch.manual_seed(0)
    model = build_mlp(1000, 2, widths=[1000], activation="tanh", init="xavier")
    expected = (5 / 3) * (2 / 2000) ** 0.5
    assert abs(model[0].weight.std().item() - expected) < 0.002


def test_bad_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="got 'swish'"):
        build_mlp(4, 2, activation="swish")
    with pytest.raises(ValueError, match="got 1.0"):
        build_mlp(4, 2, dropout=1.0)


@pytest.mark.parametrize(
    "activation, batchnorm", [("relu", False), ("prelu", True), ("selu", False), ("tanh", True)]
)
def test_a_stack_of_mlps_computes_what_each_computes(activation, batchnorm):
    from hpo.model import StackedMLP

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_mlp(8, 3, (16, 4), activation, 0.0, batchnorm))
    x = torch.randn(32, 8)
    stack = StackedMLP(models, activation)
    for training in (True, False):
        for m in models:
            m.train(training)
        out = stack.forward(x, None, None, training=training)
        assert out.shape == (3, 32, 3)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x), rtol=1e-5, atol=1e-6)
    for i, m in enumerate(models):  # batch norm's running statistics moved alike
        for name, value in m.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(stack.member_state(i)[name], value)
