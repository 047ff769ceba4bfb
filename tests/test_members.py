"""Trials of several members: repeated seeds and k-fold folds trained as one fused cohort,
each member on its own rows in its own order, the trial's value their mean with its
standard error, and the folds' model refit on the whole training pool."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from conftest import small_spec, study_run, write_spec
from mlflow import MlflowClient
from test_fused import TOLERANCE, _digits, _worst
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import parse_spec
from hpo.data import _folds, load_data
from hpo.final import refit_epochs
from hpo.model import build_mlp
from hpo.params import TrialConfig
from hpo.train import TrainConfig, fit
from hpo.trial import SEED_STEP, TrialJob, run


def _folded(folds=3, repeats=1, **over) -> dict:
    spec = small_spec(**over)
    spec["training"]["repeats"] = repeats
    del spec["dataset"]["split"]["val"]
    spec["dataset"]["split"]["folds"] = folds
    return spec


@pytest.mark.parametrize(
    "optimizer, batchnorm, patience",
    [
        ("sgd", True, 100),
        ("adam", False, 100),
        ("rmsprop", False, 100),
        ("adam", False, 1),
        ("sgd-l1", True, 100),
    ],
)
def test_a_fold_cohort_follows_the_curves_of_its_folds_trained_one_by_one(
    optimizer, batchnorm, patience
):
    """The members share one optimizer step over the stack (one configuration); with
    patience 1 they stop at different epochs, and those left go on with their own state."""
    (X, y), _ = _digits(torch.float64)  # 1,400 rows: five folds of 280
    folds = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in _folds(y.numpy(), 5, 3, True)]
    cfgs = [
        TrainConfig(optimizer=optimizer.removesuffix("-l1"), lr=0.01, batch_size=64,
                    max_epochs=6, patience=patience, monitor="val_accuracy", seed=21 + k,
                    l1=1e-3 if optimizer.endswith("-l1") else 0.0)  # L1 skips biases, BN
        for k in range(5)
    ]  # fmt: skip

    def models():
        out = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            out.append(build_mlp(64, 10, (32, 16), "relu", 0.0, batchnorm).double())
        return out

    fused = fit(models(), cfgs, (X, y), (X, y), own_rows=folds)
    alone = [
        fit([m], [c], (X, y), (X, y), own_rows=[f])[0].history
        for m, c, f in zip(models(), cfgs, folds, strict=True)
    ]
    assert _worst(alone, [r.history for r in fused]) < TOLERANCE
    if patience == 1:  # the stack shrank as members stopped
        assert len({len(r.history) for r in fused}) > 1
    # each fold learnt from its own rows: the members' curves are not one curve
    assert len({round(r.history[-1]["val_loss"], 6) for r in fused}) == 5


def test_folds_too_many_for_a_class_are_not_stratified_and_the_start_says_so():
    spec = _folded(5, dataset={"name": "digits", "max_samples": 30})
    data = load_data(parse_spec(spec), "cpu")
    assert [len(val) for _, val in data.folds] == [6] * 5
    assert any("the 5 folds are not stratified" in n for n in data.info["notes"])


def test_folds_are_stratified_disjoint_and_cover_the_pool():
    y = np.repeat(np.arange(4), 25)
    folds = _folds(y, 5, 0, stratify=True)
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen) == list(range(100))  # every row validates once
    for train_rows, val in folds:
        assert not set(train_rows) & set(val)
        assert np.bincount(y[val]).tolist() == [5, 5, 5, 5]  # each class in its share


def test_a_study_with_folds_and_repeats_stores_each_members_value_and_their_mean(
    workdir, mlflow_uri
):
    spec = parse_spec(
        _folded(3, 2, study={"n_trials": 2}, training={"max_epochs": 4},
                tracking={"uri": mlflow_uri, "log_model": "best"})
    )  # fmt: skip
    result = study_run(spec)
    study = result.study
    client = MlflowClient(mlflow_uri)
    for trial in study.trials:
        members = trial.user_attrs["members"]
        seed = trial.user_attrs["seed"]
        assert {(m["fold"], m["seed"]) for m in members} == {
            (k, (seed + r * SEED_STEP) % 2**31) for k in range(3) for r in range(2)
        }
        values = [m["value"] for m in members]
        assert len(set(values)) > 1  # six trainings, not one six times
        assert trial.value == pytest.approx(statistics.mean(values))
        se = statistics.stdev(values) / math.sqrt(len(values))
        assert trial.user_attrs["value_se"] == pytest.approx(se)
        # What the pruner read each epoch is the members' mean; each member's own curve is in
        # the trial's run.
        run_id = trial.user_attrs["mlflow_run_id"]
        curves = [
            [m.value for m in client.get_metric_history(run_id, f"member_{i}/val_accuracy")]
            for i in range(6)
        ]
        for epoch, reported in trial.intermediate_values.items():
            each = [c[epoch - 1] if epoch <= len(c) else members[i]["value"]
                    for i, c in enumerate(curves)]  # fmt: skip
            assert reported == pytest.approx(statistics.mean(each))
        logged = client.get_run(run_id).data.metrics
        assert logged["best_val_accuracy_se"] == pytest.approx(se)
    best = study.best_trial
    epochs = sorted(m["kept_epoch"] for m in best.user_attrs["members"])
    assert refit_epochs(best) == epochs[2]  # the lower middle of six
    n_pool = result.data_info["n_train"]
    assert study.user_attrs["test_model"] == (
        f"refit on all {n_pool:,} training rows for {epochs[2]} epochs"
    )
    assert set(result.test_metrics) == {"test_loss", "test_accuracy"}
    assert result.best_se == pytest.approx(best.user_attrs["value_se"])


def test_a_member_that_diverges_fails_its_trial_with_which_member_and_why():
    spec = parse_spec(small_spec(training={"max_epochs": 3, "repeats": 3}))
    data = load_data(spec, "cpu")
    config = TrialConfig.of({"n_layers": 1, "width": 16, "optimizer": "sgd", "lr": 1e12})
    records = []
    run([TrialJob(0, config, seed=5)], spec, data, lambda m, e: {}, records.append)
    (record,) = records
    assert record.outcome == "FAIL"
    assert record.failure.startswith("member seed ") and "became" in record.failure


def test_a_pruned_trial_stops_all_its_members_at_once():
    spec = parse_spec(small_spec(training={"max_epochs": 5, "repeats": 2}))
    data = load_data(spec, "cpu")
    config = TrialConfig.of({"n_layers": 1, "width": 16})
    heard, records = [], []

    def prune_at_two(metrics, epoch):
        heard.append((epoch, sorted(metrics[0])))
        return {0: "pruned" if epoch == 2 else None}

    run([TrialJob(0, config, seed=1)], spec, data, prune_at_two, records.append)
    (record,) = records
    assert record.outcome == "PRUNED" and [m.stopped_by for m in record.members] == ["pruned"] * 2
    assert [epoch for epoch, _ in heard] == [1, 2]  # one epoch message a trial, not a member
    assert "member_1/val_loss" in heard[0][1] and "val_loss" in heard[0][1]


def test_folds_and_a_validation_split_together_are_refused(workdir):
    spec = _folded(5)
    spec["dataset"]["split"]["val"] = 0.2
    out = CliRunner().invoke(app, ["validate", str(write_spec(workdir, spec))])
    assert out.exit_code == 2
    assert "dataset.split: val and folds both given" in out.output
    alone = small_spec(dataset={"split": {"final_model": "fold_ensemble"}})
    out = CliRunner().invoke(app, ["validate", str(write_spec(workdir, alone))])
    assert out.exit_code == 2
    assert "dataset.split.final_model: fold_ensemble needs dataset.split.folds" in out.output
    too_many = _folded(20, dataset={"name": "digits", "max_samples": 30})
    out = CliRunner().invoke(app, ["run", str(write_spec(workdir, too_many))])
    assert out.exit_code == 2, out.output
    assert "dataset.split.folds: 20 folds of " in out.output


def test_the_first_line_says_folds_and_members(workdir):
    out = CliRunner().invoke(
        app, ["run", str(write_spec(workdir, _folded(4, 2, study={"n_trials": 1})))]
    )
    assert out.exit_code == 0, out.output
    first = out.output.splitlines()[0]
    assert "4-fold cross-validation of " in first
    assert "2 seeds a trial (each trial 8 members trained as one cohort)" in first
    assert " ± " in out.output and "refit on all " in out.output


def test_repeats_and_folds_change_the_fingerprint_and_their_defaults_do_not():
    plain = parse_spec(small_spec()).fingerprint()
    assert parse_spec(small_spec(training={"repeats": 1})).fingerprint() == plain
    assert parse_spec(small_spec(training={"repeats": 2})).fingerprint() != plain
    assert parse_spec(_folded(5)).fingerprint() != plain


def test_the_report_and_compare_read_the_members_spread(workdir):
    """The report shows each value ± its standard error and which trials the validation does
    not tell apart from the best; `hpo compare` weighs two studies' bests by their members'
    spread, retraining nothing."""
    from hpo.reports.compare import compare_data
    from hpo.reports.data import report_data
    from hpo.reports.render import facts

    studies = []
    for name, lr in (("fold-a", 1e-3), ("fold-b", 1e-2)):
        spec = _folded(
            3, 1, name=name, study={"n_trials": 3}, training={"max_epochs": 3},
            search_space={"n_layers": 1, "width": {"type": "int", "low": 16, "high": 64},
                          "lr": lr},
        )  # fmt: skip
        studies.append(study_run(parse_spec(spec)).study)
    a = studies[0]
    d = report_data(a)
    shown = dict(facts(d))
    best = a.best_trial
    assert shown["Each trial"].startswith("the mean of 3 folds trained as one cohort")
    se = best.user_attrs["value_se"]
    assert shown["Best trial"].startswith(f"#{best.number}: val_accuracy = {best.value:.4f} ± ")
    close = [t.number for t in a.trials if t.number != best.number
             and abs(t.value - best.value) <= se]  # fmt: skip
    assert [n for n, _, _ in d.overview.close] == close
    assert "Within one standard error of the best" in shown
    assert shown["Use of the test split"].startswith(
        f"once, after the search, by trial #{best.number}, refit on all "
    )
    assert all(r.se is not None for r in d.fit_rows)

    c = compare_data(studies)
    assert [s.source for s in c.reseed] == ["members", "members"]
    assert c.reseed[0].values == [m["value"] for m in best.user_attrs["members"]]
    assert "members of the best trials (repeats, folds)" in c.verdict


@pytest.mark.parametrize(
    ("folds", "final_model"), [(3, "refit"), (3, "fold_ensemble"), (None, "refit")]
)
def test_the_folds_model_serves_the_raw_test_file_as_its_test_metrics_say(
    workdir, mlflow_uri, folds, final_model
):
    """The model a folds study logs (refit on the pool, or the mean of the fold models), or a
    one-split study's refit on train + validation, loads in a fresh process through
    mlflow.pyfunc, and scores the raw test file as recorded."""
    from test_deploy import _fresh_predictions, _tables

    target = _tables(workdir, regression=False)
    spec = small_spec(
        name=f"folds{folds}-{final_model}".replace("_", "-"),
        dataset={"name": "csv", "path": str(workdir / "train.csv"),
                 "test_path": str(workdir / "test.csv"), "target": target},
        task="auto",
        search_space={"n_layers": 1, "width": 32, "lr": 1e-2, "batch_size": 16},
        training={"max_epochs": 12, "early_stopping": {"patience": 12}},
        study={"n_trials": 2},
        tracking={"uri": mlflow_uri, "log_model": "best"},
    )  # fmt: skip
    if folds:
        del spec["dataset"]["split"]["val"]
    spec["dataset"]["split"] |= {"folds": folds, "final_model": final_model}
    result = study_run(parse_spec(spec), study_name=spec["name"])
    study = result.study
    how = study.user_attrs["test_model"]
    data = study.user_attrs["data"]
    if folds is None:  # trained on the validation rows too, for the trial's kept epoch
        pool = data["n_train"] + data["n_val"]
        epochs = study.best_trial.user_attrs["best_epoch"]
        assert how == f"refit on all {pool:,} train and validation rows for {epochs} epochs"
    else:
        assert how.startswith(
            "refit on all " if final_model == "refit" else "the mean of its 3 fold"
        )
    served = _fresh_predictions(mlflow_uri, study.user_attrs["model_uri"], workdir / "test.csv",
                                target)["predictions"]  # fmt: skip
    import pandas as pd

    truth = pd.read_csv(workdir / "test.csv")[target].tolist()
    accuracy = sum(p == t for p, t in zip(served, truth, strict=True)) / len(truth)
    assert accuracy == pytest.approx(result.test_metrics["test_accuracy"])


def test_ctrl_c_in_the_middle_of_a_trials_folds_and_a_rerun_finishes_it(workdir):
    import signal

    import optuna
    from conftest import hpo_process, wait_for
    from optuna.trial import TrialState

    spec = _folded(
        3, 2, study={"n_trials": 2, "pruner": {"name": "none"}},
        training={"max_epochs": 60, "early_stopping": {"patience": 60}},  # seconds a trial
    )  # fmt: skip
    path = write_spec(workdir, spec)
    proc = hpo_process(["run", path], workdir)
    db = "sqlite:///optuna.db"

    def members_training():  # a trial whose six members have reported two epochs
        try:
            study = optuna.load_study(study_name="tiny", storage=db)
        except KeyError:
            return None
        running = study.get_trials(states=(TrialState.RUNNING,))
        return next((t for t in running if len(t.intermediate_values) >= 2), None)

    cut = wait_for(members_training, "a trial of six members training", limit=300, process=proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    study = optuna.load_study(study_name="tiny", storage=db)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.trials[cut.number].user_attrs.get("interrupted")

    proc = hpo_process(["run", path], workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="tiny", storage=db)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    again = next(t for t in done if t.user_attrs.get("retry_of") == cut.number)
    assert again.params == cut.params and again.user_attrs["seed"] == cut.user_attrs["seed"]
    assert len(again.user_attrs["members"]) == 6 and again.user_attrs["value_se"] > 0


def test_one_member_diverging_fails_its_trial_with_its_reason_while_the_others_train():
    """Fold 0 alone trains on a row that makes its loss infinite; the trial fails with that
    member's reason (its siblings were still training), and nothing else breaks."""
    spec = parse_spec(_folded(3, training={"max_epochs": 3}))
    data = load_data(spec, "cpu")
    X, _ = data.train
    bad = int(data.folds[0][0][0])  # a training row of fold 0 only, from now on
    X[bad] = 1e30
    data.folds = [
        (train_rows if k == 0 else train_rows[train_rows != bad], val[val != bad])
        for k, (train_rows, val) in enumerate(data.folds)
    ]
    config = TrialConfig.of({"n_layers": 1, "width": 16, "optimizer": "sgd", "lr": 0.01})
    heard, records = [], []

    def hear(metrics, epoch):
        heard.append(epoch)
        return {}

    run([TrialJob(0, config, seed=3)], spec, data, hear, records.append)
    (record,) = records
    assert record.outcome == "FAIL"
    assert record.failure.startswith("member fold 0, seed 3: ") and "became" in record.failure
    assert heard == []  # a failing trial's epoch is not reported as a mean of its members


def test_a_fold_ensemble_changes_the_fingerprint_a_refit_does_not():
    refit = _folded(3)
    ensemble = _folded(3)
    ensemble["dataset"]["split"]["final_model"] = "fold_ensemble"
    explicit = _folded(3)
    explicit["dataset"]["split"]["final_model"] = "refit"
    assert parse_spec(explicit).fingerprint() == parse_spec(refit).fingerprint()
    assert parse_spec(ensemble).fingerprint() != parse_spec(refit).fingerprint()
    # one split: a refit after the search changes no trial, so stored studies resume
    one = small_spec()
    explicit_one = small_spec(dataset={"split": {"final_model": "refit"}})
    assert parse_spec(explicit_one).fingerprint() == parse_spec(one).fingerprint()


def test_reseeding_a_folds_study_is_refused_its_members_measure_the_noise(workdir):
    from hpo.config import SpecError
    from hpo.study import retrain_best

    study = study_run(parse_spec(_folded(3, study={"n_trials": 1}))).study
    with pytest.raises(SpecError, match="uses dataset.split.folds"):
        retrain_best(study, seeds=[1, 2])
