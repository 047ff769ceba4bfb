"""The hyperparameter table (hpo/params.py) and the typed trial configuration built from it."""

from __future__ import annotations

import inspect
import pickle

import pytest

from hpo.model import build_mlp
from hpo.params import PARAMS, TrialConfig, applies
from hpo.train import TrainConfig, training_params


def test_every_hyperparameter_is_the_models_or_the_trainers_and_none_is_dropped():
    model = set(inspect.signature(build_mlp).parameters) | {"n_layers", "width"}  # -> widths
    trainer = set(training_params())
    assert model.isdisjoint(trainer)
    assert set(PARAMS) == (model & set(PARAMS)) | trainer
    # a trainer's default is the table's
    for name in trainer:
        assert getattr(TrainConfig(), name) == PARAMS[name].default, name


def test_a_trial_configuration_is_typed_frozen_and_round_trips_through_storage():
    config = TrialConfig.of({"n_layers": 2, "width": [64, 16], "lr": 1, "optimizer": "sgd"})
    assert config.widths == (64, 16) and config.lr == 1.0 and isinstance(config.lr, float)
    assert config.momentum == PARAMS["momentum"].default  # what the space leaves out
    with pytest.raises(AttributeError):
        config.lr = 0.5  # frozen
    stored = config.as_dict()
    assert stored["widths"] == [64, 16] and stored["width"] == [64, 16]
    assert TrialConfig.of(stored) == config == pickle.loads(pickle.dumps(config))
    assert TrainConfig.of(config, max_epochs=3).optimizer == "sgd"


def test_a_key_the_table_lacks_is_an_error_not_dropped():
    with pytest.raises(ValueError, match="not hyperparameters: lr_decay"):
        TrialConfig.of({"lr": 0.1, "lr_decay": 0.5})


def test_what_applies_reads_the_table_and_the_optimizers_entries():
    linear = {"n_layers": 0, "optimizer": "adam"}
    assert not applies("dropout", linear) and not applies("momentum", linear)
    sgd = {"n_layers": 2, "optimizer": "sgd"}
    assert applies("momentum", sgd) and applies("nesterov", sgd) and applies("dropout", sgd)
    assert applies("momentum", {"optimizer": "rmsprop"})
    assert not applies("nesterov", {"optimizer": "rmsprop"})
    # with no optimizer known (a configuration stored as parameters only), the others apply
    assert applies("lr", {}) and applies("dropout", {"n_layers": 1})


def test_a_configuration_built_directly_has_its_widths():
    assert TrialConfig().widths == (PARAMS["width"].default,) * PARAMS["n_layers"].default
    assert TrialConfig(n_layers=0).widths == () and TrialConfig.of({"width": 64.0}).width == 64
