"""build_mlp: structure, activations, dropout, batch norm, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpo.model import RATE_STEPS, build_mlp, count_parameters, dropout, keep_mask, train_forward
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
    stack = StackedMLP(models)
    for training in (True, False):
        for m in models:
            m.train(training)
        out = stack.forward(x, None, training=training)
        assert out.shape == (3, 32, 3)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x), rtol=1e-5, atol=1e-6)
    for i, m in enumerate(models):  # batch norm's running statistics moved alike
        for name, value in m.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(stack.member_state(i)[name], value)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_the_rate(rate):
    gen = torch.Generator().manual_seed(0)
    keep = keep_mask(torch.Size([1000, 1001]), rate, torch.device("cpu"), gen).float()
    sigma = (rate * (1 - rate) / keep.numel()) ** 0.5
    assert abs(keep.mean().item() - (1 - rate)) <= 5 * sigma + 1 / RATE_STEPS
    # Every 16-bit lane of the random words is uniform: no column of 4 is biased.
    lanes = keep.flatten()[: keep.numel() // 4 * 4].view(-1, 4).mean(0)
    assert (lanes - (1 - rate)).abs().max().item() <= 5 * 2 * sigma + 1 / RATE_STEPS


def test_keep_mask_takes_one_rate_per_member_and_repeats_with_its_seed():
    rates = torch.tensor([0.0, 0.2, 0.7]).view(3, 1, 1)
    shape = torch.Size([3, 500, 400])

    def draw() -> torch.Tensor:
        return keep_mask(shape, rates, torch.device("cpu"), torch.Generator().manual_seed(7))

    keep = draw()
    assert torch.equal(keep, draw())
    kept = keep.float().mean((1, 2))
    assert kept[0].item() == 1.0
    assert kept[1:].tolist() == pytest.approx([0.8, 0.3], abs=0.01)


def test_dropout_scales_what_it_keeps_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    h = torch.randn(400, 500, requires_grad=True)
    out = dropout(h, 0.25)
    kept = out != 0
    assert torch.allclose(out[kept], h[kept] / 0.75)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    out.sum().backward()
    assert torch.allclose(h.grad, kept.float() / 0.75)


def test_alpha_dropout_keeps_selus_mean_and_variance():
    torch.manual_seed(0)
    h = torch.randn(1000, 1000)  # SELU's fixed point: mean 0, variance 1
    out = dropout(h, 0.2, alpha=True)
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)
    assert out.var().item() == pytest.approx(1.0, abs=0.01)
    assert (out == h).float().mean().item() < 0.01  # every element is transformed


@pytest.mark.parametrize("activation", ["relu", "selu"])
def test_train_forward_drops_in_training_and_is_the_model_otherwise(activation):
    torch.manual_seed(0)
    model = build_mlp(20, 3, widths=[64, 64], activation=activation, dropout=0.5)
    x = torch.randn(256, 20)
    model.train()
    torch.manual_seed(1)
    first = train_forward(model, x)
    torch.manual_seed(1)
    assert torch.equal(first, train_forward(model, x))  # the seed fixes the masks
    assert not torch.allclose(first, train_forward(model, x))  # the next draw differs
    model.eval()
    assert torch.equal(train_forward(model, x), model(x))
    model.train()
    for module in model:
        if isinstance(module, nn.Dropout | nn.AlphaDropout):
            module.p = 0.0
    assert torch.equal(train_forward(model, x), model(x))  # rate 0: nothing dropped
