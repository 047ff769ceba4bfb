"""Several objectives, constraints and the choice of the study's model (`study.metrics`,
`study.constraints`, `study.select`): the pure decisions on `FrozenTrial`s, the pruner with
several objectives, the spec's checks, and a two-objective study on digits end to end."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import small_spec, study_run
from optuna.trial import TrialState, create_trial

from hpo.config import SpecError, parse_spec
from hpo.objectives import Objectives
from hpo.outcomes import as_frozen, checkpoint_policy
from hpo.search import FirstObjective, curve_of


def _spec(**overrides) -> dict:
    """A small spec; with study.metrics and no study.metric, none (conftest's gives one)."""
    spec = small_spec(**overrides)
    if "metrics" in overrides.get("study", {}) and "metric" not in overrides["study"]:
        spec["study"].pop("metric", None)
    return spec


TWO = Objectives(("val_accuracy", "n_params"), ("maximize", "minimize"))


def _trial(number: int, accuracy: float, n_params: int, **attrs) -> optuna.trial.FrozenTrial:
    costs = {"n_params": float(n_params), **attrs.pop("costs", {})}
    return as_frozen(number, {"costs": costs, "n_params": n_params, **attrs},
                     [accuracy, float(n_params)])  # fmt: skip


TRIALS = [
    _trial(0, 0.95, 10_000),
    _trial(1, 0.97, 50_000),
    _trial(2, 0.96, 60_000),  # dominated by #1: less accurate and larger
    _trial(3, 0.90, 1_000),
    _trial(4, 0.97, 50_000),  # ties #1 on both
]


def test_the_front_holds_exactly_the_trials_nothing_dominates():
    front = [t.number for t in TWO.front(TRIALS)]
    assert front == [0, 1, 3, 4]
    for t in TWO.front(TRIALS):
        assert not any(TWO.dominated(t, o) for o in TRIALS)
    assert TWO.dominated(TRIALS[2], TRIALS[1]) and not TWO.dominated(TRIALS[1], TRIALS[4])


def test_the_model_is_the_most_accurate_feasible_trial_unless_select_says_otherwise():
    assert TWO.best(TRIALS).number == 1  # ties #4: the lower number
    assert TWO.best(list(reversed(TRIALS))).number == 1
    # the smallest model within 0.02 of the best accuracy: #0 (0.95, 10k), not #3 (0.90)
    small = Objectives(TWO.names, TWO.directions, select="val_accuracy", within=0.02,
                       then="n_params")  # fmt: skip
    assert small.best(TRIALS).number == 0
    # constraints: #1 and #4 break n_params <= 40,000, so the model comes from the others
    bounded = Objectives(TWO.names, TWO.directions, {"n_params": (None, 40_000)})
    assert bounded.best(TRIALS).number == 0
    assert [t.number for t in bounded.front(TRIALS)] == [0, 3]
    assert bounded.broken(TRIALS[1]) == ["n_params 50,000 > max 40,000"]
    assert bounded.violations(TRIALS[1]) == {"n_params.max": 10_000.0}
    # a lower bound on a validation metric, read from the trial's kept metrics
    accurate = Objectives(TWO.names, TWO.directions, {"val_accuracy": (0.96, None)})
    assert not accurate.feasible(TRIALS[0]) and accurate.feasible(TRIALS[1])


def test_a_trial_keeps_its_weights_when_it_is_on_the_front():
    complete = TRIALS[:2]
    keep = checkpoint_policy(TRIALS[3], complete, TWO, log_all=False, baseline=False)
    assert keep == (True, False)  # small: on the front, not the model
    keep = checkpoint_policy(TRIALS[2], complete, TWO, log_all=False, baseline=False)
    assert keep == (False, False)  # dominated by #1: it can never be the model
    best = _trial(7, 0.99, 70_000)
    assert checkpoint_policy(best, complete, TWO, log_all=False, baseline=False) == (True, True)
    # an infeasible trial is never the model, whatever its values
    bounded = Objectives(TWO.names, TWO.directions, {"n_params": (None, 60_000)})
    assert checkpoint_policy(best, complete, bounded, log_all=False, baseline=False) == (
        False, False
    )  # fmt: skip


def test_an_ensembles_candidates_are_the_top_feasible_trials_on_the_metric():
    """`keep_top` counts the feasible trials above a candidate, as the ensemble ranks them
    (`Objectives.ranked`): a large, accurate, infeasible trial takes no place."""
    bounded = Objectives(TWO.names, TWO.directions, {"n_params": (None, 65_000)})
    complete = TRIALS[:2] + [_trial(5, 0.99, 90_000)]  # #5: the most accurate, infeasible
    assert [t.number for t in bounded.ranked(complete)] == [1, 0]
    third = _trial(6, 0.96, 60_000)  # dominated by #1; third on accuracy, second if feasible
    keep = checkpoint_policy(third, complete, bounded, log_all=False, baseline=False, keep_top=2)
    assert keep == (True, False)
    keep = checkpoint_policy(third, complete, bounded, log_all=False, baseline=False, keep_top=1)
    assert keep == (False, False)
    assert [t.number for t in bounded.ranked([*complete, third])] == [1, 6, 0]


def test_with_several_objectives_a_trial_is_pruned_only_against_nets_no_larger():
    """The median rule on the first objective, over the complete trials with at most as
    many parameters: a small net is not pruned for trailing big ones."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for n_params, curve in ((100_000, [0.90, 0.95, 0.97]), (120_000, [0.91, 0.95, 0.97]),
                            (2_000, [0.60, 0.70, 0.80]), (2_500, [0.62, 0.72, 0.82])):  # fmt: skip
        study.add_trial(
            create_trial(
                values=[curve[-1], n_params],
                state=TrialState.COMPLETE,
                user_attrs={"n_params": n_params, "curve": curve},
            )  # fmt: skip
        )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    small = curve_of(as_frozen(9, {}, None), [0.65, 0.75])  # behind the big nets
    assert not pruner.prune(FirstObjective(study, 3_000), small)
    assert pruner.prune(FirstObjective(study, 200_000), small)  # as big: behind the median
    weak = curve_of(as_frozen(9, {}, None), [0.55, 0.65])
    assert pruner.prune(FirstObjective(study, 3_000), weak)  # behind nets its own size


@pytest.mark.parametrize(
    "study, message",
    [
        ({"metrics": ["n_params", "val_accuracy"]}, "study.metrics[0]: 'n_params' must be a "
         "validation metric"),
        ({"metrics": ["val_accuracy", "flops"]}, "study.metrics[1]: 'flops' is neither"),
        ({"metrics": ["val_accuracy", "n_params"], "sampler": {"name": "cmaes"}},
         "study.sampler.name: cmaes takes one objective"),
        ({"metrics": ["val_accuracy", "n_params"], "pruner": {"name": "hyperband"}},
         "study.pruner.name: hyperband cannot prune a study with several objectives"),
        ({"metric": "val_loss", "metrics": ["val_accuracy", "n_params"]},
         "study: metric 'val_loss' is not the first of metrics ('val_accuracy')"),
        ({"constraints": {"n_params": {}}}, "give min, max or both"),
        ({"constraints": {"latency": {"max": 1}}}, "study.constraints.latency: not a "
         "validation metric or a cost"),
        ({"select": {"then": "size"}}, "study.select.then: 'size' is not"),
        ({"select": {"within": 0.01}}, "study.select: within needs then"),
    ],
)  # fmt: skip
def test_a_bad_objective_is_one_clear_line(study, message):
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(study=study))
    assert any(message in p for p in e.value.problems), e.value.problems


def test_objectives_and_constraints_change_the_fingerprint_and_the_choice_does_not():
    plain = parse_spec(small_spec()).fingerprint()
    two = parse_spec(_spec(study={"metrics": ["val_accuracy", "n_params"]}))
    assert two.study.metric == "val_accuracy" and two.fingerprint() != plain
    bounded = small_spec(study={"constraints": {"n_params": {"max": 1000}}})
    assert parse_spec(bounded).fingerprint() != plain
    chosen = small_spec(study={"select": {"within": 0.01, "then": "n_params"}})
    assert parse_spec(chosen).fingerprint() == plain


def test_a_two_objective_study_with_constraints_finds_marks_and_chooses(workdir):
    """val_accuracy against n_params on digits, with a bound on n_params (checked before
    training) and on val_accuracy (after): the front is non-dominated, infeasible trials
    are marked, the model follows study.select, and the report shows the front."""
    from hpo.reports import write_report

    spec = _spec(
        name="front",
        search_space={
            "n_layers": {"type": "int", "low": 1, "high": 2},
            "width": {"type": "int", "low": 4, "high": 128, "log": True},
            "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
            "batch_size": 64,
        },
        training={"max_epochs": 4, "early_stopping": {"patience": 4}},
        study={
            "n_trials": 14,
            "metrics": ["val_accuracy", "n_params"],
            "constraints": {"n_params": {"max": 12_000}, "val_accuracy": {"min": 0.8},
                            "inference_ms": {"max": 1e6}},
            "select": {"within": 0.03, "then": "n_params"},
            "sampler": {"name": "nsga2", "seed": 0, "population_size": 6},
            "pruner": {"name": "none"},
        },
        tracking={"log_model": "best"},
    )  # fmt: skip
    result = study_run(parse_spec(spec), study_name="front")
    study = result.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]  # fmt: skip
    trials = study.get_trials(deepcopy=False)
    early = [
        t for t in trials if "infeasible before training" in t.user_attrs.get("fail_reason", "")
    ]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert early, "the space's large nets fail before training"
    assert all(t.user_attrs["n_params"] > 12_000 for t in early)
    assert complete and all(t.user_attrs["n_params"] <= 12_000 for t in complete)
    for t in complete:  # measured, recorded, and told to Optuna's samplers
        assert t.values[1] == t.user_attrs["n_params"] == t.user_attrs["costs"]["n_params"]
        assert t.user_attrs["costs"]["inference_ms"] > 0
        feasible = t.values[0] >= 0.8
        assert t.user_attrs["feasible"] is feasible
        assert (t.constraints["val_accuracy.min"] <= 0) is feasible
    objectives = Objectives.of_study(study)
    front = objectives.front(trials)
    feasible = [t for t in complete if t.user_attrs["feasible"]]
    assert front and all(not any(objectives.dominated(t, o) for o in feasible) for t in front)
    # the model: the smallest feasible net within 0.03 of the most accurate feasible one
    top = max(t.values[0] for t in feasible)
    window = [t for t in feasible if t.values[0] >= top - 0.03]
    chosen = min(window, key=lambda t: (t.values[1], -t.values[0], t.number))
    assert result.best_number == chosen.number
    assert study.user_attrs["test_trial"] == chosen.number
    assert study.user_attrs["model_trial"] == chosen.number
    assert result.front["chosen"] == chosen.number
    assert {r["number"] for r in result.front["front"]} == {t.number for t in front}
    assert set(result.front["infeasible"]) == {
        t.number for t in complete if not t.user_attrs["feasible"]
    }

    out = write_report(study, workdir / "reports")
    md = (out / "report.md").read_text()
    assert "## Pareto front" in md and (out / "front.png").stat().st_size > 0
    assert f"| {chosen.number} |" in md and "the study's model" in md
    data = json.loads((out / "report.json").read_text())
    assert data["front"]["chosen"] == chosen.number


# ---------------------------------------------------------------- warm starts


def _warm_spec(name: str, lr_high: float, width_high: int, n_trials: int) -> dict:
    return small_spec(
        name=name,
        search_space={
            "n_layers": 1,
            "width": {"type": "int", "low": 16, "high": width_high, "log": True},
            "lr": {"type": "float", "low": 1e-3, "high": lr_high, "log": True},
            "batch_size": 64,
        },
        training={"max_epochs": 2, "early_stopping": {"patience": 2}},
        study={
            "n_trials": n_trials,
            "sampler": {"name": "tpe", "seed": 3, "n_startup_trials": 4},
            "pruner": {"name": "none"},
        },  # fmt: skip
    )


def test_a_warm_start_adds_the_earlier_trials_that_fit_marks_them_and_learns_from_them(workdir):
    """A study with a wider lr range and a narrower width range starts from a finished
    one: its trials inside the new space are added (marked, outside the budget), the others
    counted with the reason, and the sampler's first proposal differs from a cold start."""
    from hpo.outcomes import count_finished, state_counts
    from hpo.warm import ATTR, STUDY_ATTR

    old = study_run(parse_spec(_warm_spec("narrow", 1e-2, 64, 8)), study_name="narrow").study
    wide = _warm_spec("wide", 1e-1, 40, 3)
    wide["study"]["warm_start"] = ["narrow"]
    warmed = study_run(parse_spec(wide), study_name="wide").study
    cold = study_run(parse_spec(_warm_spec("cold", 1e-1, 40, 3)), study_name="cold").study

    fits = [t for t in old.trials if t.params["width"] <= 40]
    assert 0 < len(fits) < len(old.trials), "the test needs trials on both sides of 40"
    added = [t for t in warmed.trials if ATTR in t.user_attrs]
    assert [t.user_attrs[ATTR] for t in added] == [f"narrow#{t.number}" for t in fits]
    assert [t.values for t in added] == [t.values for t in fits]
    assert [t.params for t in added] == [t.params for t in fits]
    assert all(t.state == TrialState.COMPLETE for t in added)
    record = warmed.user_attrs[STUDY_ATTR]["narrow"]
    assert record["added"] == len(fits)
    skipped = len(old.trials) - len(fits)
    assert record["skipped"] == {"outside the new search space (width outside 16 to 40)": skipped}
    # the budget counts the new study's own trials only
    assert count_finished(warmed) == 3 and state_counts(warmed.trials)["WARM"] == len(fits)
    assert len(warmed.trials) == 3 + len(fits)
    # the sampler learnt from them: its first proposal is not the cold start's
    first_warm = next(t for t in warmed.trials if ATTR not in t.user_attrs)
    assert first_warm.params != cold.trials[0].params
    # a rerun adds nothing again
    study_run(parse_spec(wide), study_name="wide")
    assert sum(ATTR in t.user_attrs for t in warmed.trials) == len(fits)


def test_a_warm_start_from_other_training_settings_adds_nothing_and_says_why(workdir):
    from hpo.warm import STUDY_ATTR

    study_run(parse_spec(_warm_spec("short", 1e-2, 64, 2)), study_name="short")
    longer = _warm_spec("longer", 1e-2, 64, 1)
    longer["training"]["max_epochs"] = 3
    longer["study"]["warm_start"] = ["short"]
    study = study_run(parse_spec(longer), study_name="longer").study
    assert study.user_attrs[STUDY_ATTR]["short"] == {
        "added": 0, "skipped": {"other training settings, objectives or constraints": 2}
    }  # fmt: skip
    missing = _warm_spec("lost", 1e-2, 64, 1)
    missing["study"]["warm_start"] = ["nowhere"]
    with pytest.raises(SpecError, match="--warm-start nowhere: no study of that name"):
        study_run(parse_spec(missing), study_name="lost")


# ---------------------------------------------------------------- the model registry


def _iris_spec(workdir, mlflow_uri, name: str, lr: float, baseline_lr: float) -> dict:
    from test_deploy import _tables

    target = _tables(workdir, regression=False)
    return small_spec(
        name=name,
        dataset={"name": "csv", "path": str(workdir / "train.csv"),
                 "test_path": str(workdir / "test.csv"), "target": target},
        task="auto",
        search_space={"n_layers": 1, "width": 32, "lr": lr, "batch_size": 16},
        training={"max_epochs": 10, "early_stopping": {"patience": 10}},
        study={"n_trials": 2, "sampler": {"name": "random", "seed": 0}},
        tracking={"uri": mlflow_uri, "log_model": "best"},
        baselines=[{"name": "base", "n_layers": 1, "width": 32, "lr": baseline_lr,
                    "batch_size": 16}],
    )  # fmt: skip


def test_a_model_that_beats_the_baselines_is_the_registrys_champion_in_a_fresh_process(
    workdir, mlflow_uri
):
    """The study's model, once it beats the best baseline on validation, is registered under
    the study's name with the alias `champion`; `models:/NAME@champion` loads in a process
    without hpo and scores the raw test file as recorded. A study whose baseline wins
    registers nothing."""
    import pandas as pd
    from mlflow import MlflowClient
    from test_deploy import _fresh_predictions

    from hpo.api import Result

    result = study_run(parse_spec(_iris_spec(workdir, mlflow_uri, "iris-win", 3e-2, 1e-5)))
    study = result.study
    champion = study.user_attrs["champion"]
    assert champion["uri"] == "models:/iris-win@champion" and champion["trial"] != 0
    assert champion["trial"] == result.best_number
    version = MlflowClient(mlflow_uri).get_model_version_by_alias("iris-win", "champion")
    assert str(version.version) == champion["version"]
    served = _fresh_predictions(mlflow_uri, champion["uri"], workdir / "test.csv", "species")
    truth = pd.read_csv(workdir / "test.csv")["species"].tolist()
    hits = sum(p == t for p, t in zip(served["predictions"], truth, strict=True))
    assert hits / len(truth) == pytest.approx(result.test_metrics["test_accuracy"])
    assert Result.of(study, mlflow_uri).best_model() is not None  # hpo predict's path

    lost = study_run(parse_spec(_iris_spec(workdir, mlflow_uri, "iris-lose", 1e-6, 3e-2)))
    assert lost.best_number == 0  # the baseline
    assert "champion" not in lost.study.user_attrs
    assert not MlflowClient(mlflow_uri).search_registered_models(filter_string="name='iris-lose'")
