"""Search space -> Optuna suggestions: fixed values, conditionals, per-layer widths, grids."""

from __future__ import annotations

import optuna
import pytest
from conftest import small_spec

from hpo.config import parse_spec
from hpo.distributions import grid_points
from hpo.params import PARAMS
from hpo.space import grid_space, suggest_params


def sample(space: dict, n: int = 20, seed: int = 0) -> list[dict]:
    spec = parse_spec(small_spec(search_space=space))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest_params(trial, spec.space).as_dict())
        study.tell(trial, 0.0)
    return out


def test_fixed_values_and_defaults_fill_every_known_hyperparameter():
    (params,) = sample({"lr": 0.05, "n_layers": 3, "width": 32}, n=1)
    assert set(PARAMS) <= set(params)
    assert params["lr"] == 0.05 and params["widths"] == [32, 32, 32]
    assert params["optimizer"] == PARAMS["optimizer"].default


def test_distributions_stay_in_range_and_log_int_is_int():
    rows = sample(
        {
            "width": {"type": "int", "low": 16, "high": 256, "log": True},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        }
    )
    assert all(16 <= r["width"] <= 256 and isinstance(r["width"], int) for r in rows)
    assert all(1e-4 <= r["lr"] <= 1e-1 for r in rows)


def test_conditional_is_sampled_only_when_its_condition_holds():
    space = {
        "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": ["sgd"]}},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
    }
    spec = parse_spec(small_spec(search_space=space))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        p = suggest_params(trial, spec.space).as_dict()
        seen.add(p["optimizer"])
        assert ("momentum" in trial.params) == (p["optimizer"] == "sgd")
        assert (p["momentum"] >= 0.5) == (p["optimizer"] == "sgd")
        study.tell(trial, 0.0)
    assert seen == {"sgd", "adam"}


def test_per_layer_widths_follow_n_layers():
    rows = sample(
        {
            "n_layers": {"type": "int", "low": 0, "high": 3},
            "width": {"type": "int", "low": 8, "high": 64, "per_layer": True},
        },
        n=30,
    )
    assert {len(r["widths"]) for r in rows} == {0, 1, 2, 3}
    assert all(len(r["widths"]) == r["n_layers"] for r in rows)
    assert all(8 <= w <= 64 for r in rows for w in r["widths"])


def test_grid_space_values():
    spec = parse_spec(
        small_spec(
            search_space={
                "n_layers": {"type": "int", "low": 1, "high": 2},
                "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                "dropout": {"type": "float", "low": 0.0, "high": 0.4, "step": 0.2},
                "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
                "width": {"type": "int", "low": 8, "high": 16, "step": 8, "per_layer": True},
            }
        )
    )
    grid = grid_space(spec.space)
    assert grid["n_layers"] == [1, 2]
    assert [round(v, 6) for v in grid["lr"]] == [0.001, 0.004642, 0.021544, 0.1]
    assert [round(v, 6) for v in grid["dropout"]] == [0.0, 0.2, 0.4]
    assert grid["activation"] == ["relu", "tanh"]
    assert grid["width_0"] == grid["width_1"] == [8, 16]


@pytest.mark.parametrize(
    "name, entry, walked",
    [
        ("width", {"type": "categorical", "choices": [16, 32, 64]}, 3),
        ("batch_size", {"type": "int", "low": 1, "high": 4}, 4),
        ("batch_size", {"type": "int", "low": 1, "high": 9, "step": 4}, 3),
        ("batch_size", {"type": "int", "low": 1, "high": 10, "step": 4}, 3),
        ("batch_size", {"type": "int", "low": 1, "high": 2, "log": True}, 2),  # counted 4 once
        ("width", {"type": "int", "low": 16, "high": 1024, "log": True}, 4),
        ("dropout", {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1}, 4),  # counted 3
        ("dropout", {"type": "float", "low": 0.0, "high": 0.25, "step": 0.1}, 3),
        ("dropout", {"type": "float", "low": 0.1, "high": 0.1, "step": 0.1}, 1),
        ("lr", {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, 4),
        ("dropout", {"type": "float", "low": 0.0, "high": 0.5}, 4),
    ],
)
def test_grid_points_counts_the_grid_optuna_walks(name, entry, walked):
    """The size the spec's check counts (`grid_points`) is the number of trials a grid study
    runs before Optuna's GridSampler has walked every point."""
    spec = parse_spec(small_spec(search_space={name: entry}))
    d = spec.space[name]
    sampler = optuna.samplers.GridSampler(grid_space(spec.space), seed=0)
    study = optuna.create_study(sampler=sampler)
    seen = []
    study.optimize(
        lambda t: seen.append(suggest_params(t, spec.space).as_dict()[name]) or 0.0, 100
    )
    assert len(seen) == len(set(map(str, seen))) == walked
    assert grid_points(d) == walked


def test_which_trials_lead_a_cohort():
    from hpo.params import TrialConfig
    from hpo.resources import Shape
    from hpo.space import leads_a_cohort

    spec = parse_spec(small_spec(study={"fused_trials": 4}))
    alone = parse_spec(small_spec(study={"fused_trials": 1}))
    grid = parse_spec(small_spec(study={"fused_trials": 4, "sampler": {"name": "grid"}}))
    shape = Shape(n_features=784, n_outputs=10, n_rows=1200)
    small = TrialConfig.of({"n_layers": 2, "width": 64})
    wide = TrialConfig.of({"n_layers": 2, "width": 512})
    assert leads_a_cohort(spec, {}, small, shape, on_cpu=True)
    assert not leads_a_cohort(alone, {}, small, shape, on_cpu=True)
    assert not leads_a_cohort(grid, {}, small, shape, on_cpu=True)  # the grid runs alone
    assert not leads_a_cohort(spec, {"baseline": "mlp"}, small, shape, on_cpu=True)
    assert not leads_a_cohort(spec, {"retry_of": 3}, small, shape, on_cpu=True)
    assert not leads_a_cohort(spec, {}, wide, shape, on_cpu=True)  # a CPU-bound wide net
    assert leads_a_cohort(spec, {}, wide, shape, on_cpu=False)  # on a GPU it pays
