"""Studies against a real Optuna storage and a real MLflow store, on digits with tiny budgets."""

from __future__ import annotations

import optuna
import pytest
from conftest import small_spec, study_run
from mlflow import MlflowClient

from hpo._private import RecentTrials
from hpo.config import SpecError, parse_spec
from hpo.executors.worker import AHEAD
from hpo.outcomes import as_frozen
from hpo.registry import PRUNERS, SAMPLERS
from hpo.search import curve_of, make_pruner, make_sampler, prune_window


def run(workdir, mlflow_uri, name, **over):
    spec = parse_spec(
        small_spec(name=name, tracking={"uri": mlflow_uri, **over.pop("tracking", {})}, **over)
    )
    return study_run(spec)


def child_runs(uri, result):
    client = MlflowClient(uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    return client, sorted(runs, key=lambda r: int(r.data.tags["hpo.trial_number"]))


def test_study_tracks_every_trial_and_evaluates_best_once(workdir, mlflow_uri):
    result = run(workdir, mlflow_uri, "tracked", tracking={"log_model": "best"})
    assert result.counts["COMPLETE"] == 3 and result.new_trials == 3
    assert (workdir / "optuna.db").is_file()
    study = optuna.load_study(study_name="tracked", storage="sqlite:///optuna.db")
    attrs = study.user_attrs
    assert attrs["test_trial"] == study.best_trial.number == result.best_number
    assert 0.5 < attrs["test_metrics"]["test_accuracy"] <= 1.0
    assert attrs["data"]["n_test"] == 360 and len(attrs["data"]["split_hash"]) == 16
    assert study.metric_names == ["val_accuracy"]  # optuna-dashboard names its axis with it

    client, runs = child_runs(mlflow_uri, result)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy"] == attrs["test_metrics"]["test_accuracy"]
    assert parent.data.tags["hpo.study"] == "tracked"
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    models = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert any(m.source_run_id == parent.info.run_id for m in models)

    assert [r.data.tags["hpo.trial_number"] for r in runs] == ["0", "1", "2"]
    assert {r.data.tags["hpo.state"] for r in runs} == {"COMPLETE"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for t, r in zip(study.trials, runs, strict=True):
        assert (
            t.user_attrs["fit"] in ("overfit", "underfit", "good") and t.user_attrs["fit_evidence"]
        )
        assert r.data.tags["hpo.fit"] == t.user_attrs["fit"]
        assert r.data.tags["hpo.fit_evidence"] == t.user_attrs["fit_evidence"]
    trial = study.trials[0]
    curve = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in curve] == list(range(1, trial.user_attrs["epochs_run"] + 1))
    assert runs[0].data.params["activation"] == trial.params["activation"]
    best_run = runs[result.best_number]
    assert best_run.data.metrics["best_val_accuracy"] == pytest.approx(result.best_value)


def test_rerun_resumes_to_the_total_under_the_same_parent(workdir, mlflow_uri):
    first = run(workdir, mlflow_uri, "resumed", study={"n_trials": 2})
    again = run(workdir, mlflow_uri, "resumed", study={"n_trials": 2})
    assert again.new_trials == 0 and again.test_metrics == first.test_metrics
    more = run(workdir, mlflow_uri, "resumed", study={"n_trials": 4})
    assert (
        more.new_trials == 2 and sum(more.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 4
    )
    assert first.parent_run_id == again.parent_run_id == more.parent_run_id
    _, runs = child_runs(mlflow_uri, more)
    assert [r.data.tags["hpo.trial_number"] for r in runs] == ["0", "1", "2", "3"]


def test_resumed_random_search_does_not_replay_its_first_draws(workdir, mlflow_uri):
    run(workdir, mlflow_uri, "replay", study={"n_trials": 2})
    run(workdir, mlflow_uri, "replay", study={"n_trials": 4})
    study = optuna.load_study(study_name="replay", storage="sqlite:///optuna.db")
    lrs = [t.params["lr"] for t in study.trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs


def test_a_resumed_study_keeps_its_seed_override(workdir, mlflow_uri):
    tracking = {"uri": mlflow_uri}
    study_run(parse_spec(small_spec(name="seeded", tracking=tracking)), seed=11)
    more = small_spec(name="seeded", tracking=tracking, study={"n_trials": 4})
    study_run(parse_spec(more))  # no --seed: the study's own
    study = optuna.load_study(study_name="seeded", storage="sqlite:///optuna.db")
    assert study.user_attrs["seed"] == 11
    # trial seeds come from the override: trial k trains with 11 * 100003 + k
    assert [t.user_attrs.get("seed") for t in study.trials] == [11 * 100_003 + k for k in range(4)]


def test_changed_search_space_is_refused_with_a_way_out(workdir, mlflow_uri):
    run(workdir, mlflow_uri, "frozen", study={"n_trials": 1})
    spec = small_spec(name="frozen", tracking={"uri": mlflow_uri})
    spec["search_space"]["batch_size"] = 32
    with pytest.raises(SpecError) as info:
        study_run(parse_spec(spec))
    assert "different spec" in info.value.problems[0] and "--study-name" in info.value.problems[0]
    assert len(optuna.load_study(study_name="frozen", storage="sqlite:///optuna.db").trials) == 1


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir, mlflow_uri):
    result = run(
        workdir,
        mlflow_uri,
        "unstable",
        search_space={
            "optimizer": "sgd",
            "lr": {"type": "categorical", "choices": [0.05, 1.0e12]},
            "n_layers": 1,
            "width": 16,
        },
        study={"n_trials": 2, "sampler": {"name": "grid", "seed": 0}},
    )
    assert result.counts["COMPLETE"] == 1 and result.counts["FAIL"] == 1
    study = optuna.load_study(study_name="unstable", storage="sqlite:///optuna.db")
    failed = [t for t in study.trials if t.state.name == "FAIL"][0]
    assert failed.params["lr"] == 1.0e12 and "became" in failed.user_attrs["fail_reason"]
    _, runs = child_runs(mlflow_uri, result)
    bad = runs[failed.number]
    assert bad.info.status == "FAILED" and bad.data.tags["hpo.state"] == "FAIL"
    assert "became" in bad.data.tags["hpo.fail_reason"]


def test_median_pruner_prunes_hopeless_trials(workdir, mlflow_uri):
    result = run(
        workdir,
        mlflow_uri,
        "pruned",
        search_space={
            "lr": {"type": "categorical", "choices": [3e-2, 1e-7]},
            "n_layers": 1,
            "width": 32,
        },
        training={"max_epochs": 10, "early_stopping": {"patience": 10}},
        study={
            "n_trials": 6,
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        },
    )
    study = optuna.load_study(study_name="pruned", storage="sqlite:///optuna.db")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    first_good = min(t.number for t in study.trials if t.state.name == "COMPLETE")
    hopeless = [t for t in study.trials if t.params["lr"] == 1e-7 and t.number > first_good]
    assert hopeless and all(t.state.name == "PRUNED" for t in hopeless)
    # Pruned at their first epoch, and stopped at the latest when the worker, which trains on
    # while the driver answers (`hpo.executors.worker._Answers`), has AHEAD epochs unanswered.
    assert all(len(t.intermediate_values) <= 1 + AHEAD for t in hopeless)
    _, runs = child_runs(mlflow_uri, result)
    assert {runs[t.number].data.tags["hpo.state"] for t in pruned} == {"PRUNED"}


def test_no_trial_is_pruned_at_its_last_epoch(workdir, mlflow_uri):
    """The same hopeless trials with 1 epoch a trial: pruning them then would save nothing,
    so they complete (with their poor value) rather than being called pruned."""
    run(
        workdir,
        mlflow_uri,
        "last-epoch",
        search_space={"lr": {"type": "categorical", "choices": [3e-2, 1e-7]}, "n_layers": 1},
        study={
            "n_trials": 6,
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        },
        training={"max_epochs": 1, "early_stopping": {"patience": 1}},
    )
    study = optuna.load_study(study_name="last-epoch", storage="sqlite:///optuna.db")
    assert {t.params["lr"] for t in study.trials} == {3e-2, 1e-7}  # hopeless ones were tried
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6


def test_same_seed_gives_the_same_trials(workdir, mlflow_uri):
    a = run(workdir, mlflow_uri, "seed-a", study={"sampler": {"name": "tpe", "seed": 7}})
    b = run(workdir, mlflow_uri, "seed-b", study={"sampler": {"name": "tpe", "seed": 7}})

    def values(name):
        study = optuna.load_study(study_name=name, storage="sqlite:///optuna.db")
        return [t.value for t in study.trials]

    assert values("seed-a") == values("seed-b")
    assert a.best_params == b.best_params


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_study(workdir, mlflow_uri, sampler):
    result = run(
        workdir,
        mlflow_uri,
        f"sampler-{sampler}",
        search_space={
            "n_layers": {"type": "int", "low": 1, "high": 2},
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
        },
        study={"n_trials": 2, "sampler": {"name": sampler, "seed": 0}},
        training={"max_epochs": 2},
    )
    assert result.counts["COMPLETE"] == 2 and result.test_metrics["test_accuracy"] > 0.3


@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_pruner_builds(pruner):
    spec = parse_spec(small_spec(study={"pruner": {"name": pruner}}))
    assert isinstance(make_pruner(spec), optuna.pruners.BasePruner)


def test_pruner_and_sampler_options_pass_through_and_are_checked():
    spec = parse_spec(
        small_spec(
            study={
                "pruner": {"name": "percentile", "percentile": 40.0},
                "sampler": {"name": "tpe", "n_startup_trials": 3},
            }
        )
    )
    assert make_pruner(spec)._percentile == 40.0
    assert make_sampler(spec)._n_startup_trials == 3
    patient = parse_spec(
        small_spec(study={"pruner": {"name": "patient", "patience": 3, "wrapped": "hyperband"}})
    )
    assert isinstance(make_pruner(patient)._wrapped_pruner, optuna.pruners.HyperbandPruner)
    bad = parse_spec(small_spec(study={"sampler": {"name": "random", "n_startup_trials": 3}}))
    with pytest.raises(
        SpecError, match="study.sampler.n_startup_trials: not an option of the random sampler"
    ):
        make_sampler(bad)
    bad = parse_spec(small_spec(study={"pruner": {"name": "percentile", "percentile": 140.0}}))
    with pytest.raises(SpecError, match="study.pruner: "):
        make_pruner(bad)
    bad = parse_spec(small_spec(study={"pruner": {"name": "median", "warmup": 3}}))
    with pytest.raises(SpecError, match="study.pruner.warmup: not an option of the median pruner"):
        make_pruner(bad)


@pytest.mark.parametrize(
    "pruner",
    [
        {"name": "median"},
        {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 4, "interval_steps": 3},
        {"name": "percentile", "percentile": 90.0, "n_warmup_steps": 2, "interval_steps": 2},
        {"name": "patient", "patience": 0, "wrapped": "median", "n_warmup_steps": 5},
    ],
)
def test_the_epochs_where_the_driver_skips_the_pruner_are_those_where_it_says_no(pruner):
    """The driver does not ask the pruner where `prune_window` says it cannot prune: checked
    against Optuna's own answer, epoch by epoch, for every count of completed trials, with a
    trial that is worse than every other at every epoch (so it is pruned wherever it can)."""
    spec = parse_spec(small_spec(study={"pruner": pruner}))
    window = prune_window(spec)
    assert window is not None
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    recent = RecentTrials(study, fresh_s=0.0)
    asked, skipped = 0, 0
    for completed in range(8):
        worst = study.ask()
        for epoch in range(1, 13):
            worst.report(0.1, epoch)
            pruned = worst.should_prune()
            # the driver's way: the curve it holds, against the trials it last read
            curve = curve_of(as_frozen(worst.number, {}, None), [0.1] * epoch)
            assert study.pruner.prune(recent, curve) == pruned, (pruner, completed, epoch)
            asked += 1
            if not window.may_prune(epoch, completed):
                skipped += 1
                assert not pruned, (pruner, completed, epoch)
            elif completed and pruner["name"] != "patient":
                assert pruned, (pruner, completed, epoch)  # the window is not too narrow
        study.tell(worst, state=optuna.trial.TrialState.FAIL)
        good = study.ask()
        for epoch in range(1, 13):
            good.report(0.9, epoch)
        study.tell(good, 0.9)
    assert 0 < skipped < asked
    # Pruners without such a window are asked at every epoch.
    assert prune_window(parse_spec(small_spec(study={"pruner": {"name": "hyperband"}}))) is None


def test_recent_trials_are_read_again_after_fresh_s_or_once_forgotten():
    study = optuna.create_study()
    study.enqueue_trial({})
    study.tell(study.ask(), 1.0)
    recent = RecentTrials(study, fresh_s=3600.0)
    assert [t.value for t in recent.get_trials(deepcopy=False)] == [1.0]
    study.tell(study.ask(), 2.0)
    assert len(recent.get_trials(deepcopy=False)) == 1  # read an hour ago, as far as it knows
    recent.forget()
    done = recent.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.value for t in done] == [1.0, 2.0]
    assert recent.get_trials(states=(optuna.trial.TrialState.PRUNED,)) == []
    assert RecentTrials(study, fresh_s=0.0).trials[-1].value == 2.0


def test_changed_data_behind_the_same_spec_is_refused(workdir, mlflow_uri):
    rows = "".join(f"{i},{(i * 7) % 11},{'a' if i % 3 else 'b'}\n" for i in range(60))
    (workdir / "d.csv").write_text("x1,x2,label\n" + rows)
    spec = small_spec(
        name="csv-data",
        dataset={"name": "csv", "path": "d.csv", "target": "label"},
        study={"n_trials": 1},
        tracking={"uri": mlflow_uri},
    )
    study_run(parse_spec(spec, source_dir=workdir))
    with open(workdir / "d.csv", "a") as f:
        f.write("".join(f"{i},{i % 5},b\n" for i in range(60, 80)))
    with pytest.raises(SpecError, match="the data of study 'csv-data' changed"):
        study_run(parse_spec(spec, source_dir=workdir))


def test_regression_study_minimises_rmse_and_reports_test_rmse(workdir, mlflow_uri):
    lines = "".join(
        f"{i % 10},{(i * 3) % 7},{2.5 * (i % 10) - (i * 3) % 7 + 0.1}\n" for i in range(150)
    )
    (workdir / "r.csv").write_text("x1,x2,y\n" + lines)
    spec = small_spec(
        name="regression",
        dataset={"name": "csv", "path": "r.csv", "target": "y"},
        task="auto",
        search_space={
            "n_layers": 1,
            "width": 32,
            "lr": {"type": "float", "low": 1e-3, "high": 3e-2},
        },
        training={"max_epochs": 20, "early_stopping": {"monitor": "val_rmse"}},
        study={"n_trials": 2, "metric": "val_rmse"},
        tracking={"uri": mlflow_uri},
    )
    result = study_run(parse_spec(spec, source_dir=workdir))
    study = optuna.load_study(study_name="regression", storage="sqlite:///optuna.db")
    assert study.direction.name == "MINIMIZE"
    assert result.best_value == min(t.value for t in study.trials)
    assert 0 < result.test_metrics["test_rmse"] < 5  # target std is about 7.5


def test_user_attrs_set_together_are_one_transaction(tmp_path):
    """The driver stores a finished trial's attributes in one commit: all of them land, the
    trial sees them, and one that cannot be stored leaves none half-written."""
    from hpo.outage import Retry
    from hpo.storage import open_storage, set_user_attrs

    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = open_storage(url, retry=Retry("Optuna storage", url, 0.0))
    study = optuna.create_study(study_name="attrs", storage=storage)
    trial = study.ask()
    attrs = {"n_params": 1234, "metrics": {"val_loss": 0.25}, "fit": "good", "fused_with": [3, 4]}
    set_user_attrs(trial, attrs)
    assert trial.user_attrs == attrs  # what the driver reads back
    stored = optuna.load_study(study_name="attrs", storage=url).trials[0].user_attrs
    assert stored == attrs  # another process's view
    with pytest.raises(TypeError):  # not JSON: the whole transaction is dropped
        set_user_attrs(trial, {"epochs_run": 7, "bad": object()})
    stored = optuna.load_study(study_name="attrs", storage=url).trials[0].user_attrs
    assert "epochs_run" not in stored and stored == attrs
