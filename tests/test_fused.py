"""Fused trials: members trained as one stacked model follow the curves they follow alone, stop
on their own (pruning, early stopping, a non-finite loss) and are trials like any other."""

from __future__ import annotations

import signal
from dataclasses import replace

import optuna
import pytest
import torch
from conftest import (
    hpo_process,
    kill_a_worker_training,
    small_spec,
    study_run,
    wait_for,
    write_spec,
)
from mlflow import MlflowClient
from optuna.trial import TrialState
from sklearn.datasets import load_digits

from hpo.config import parse_spec
from hpo.data import load_data
from hpo.model import build_mlp
from hpo.params import TrialConfig
from hpo.registry import LR_SCHEDULES, OPTIMIZERS, Entry
from hpo.space import structure
from hpo.train import TrainConfig, fit, train
from hpo.trial import CohortJob, TrialJob, run

# Relative difference allowed between a member's per-epoch losses fused and alone. The stacked
# products add in another order, so the two differ by rounding, which some configurations
# amplify chaotically: in float32, ReLU units at the edge of dying and adaptive optimizers (which
# scale a gradient of rounding noise up to a full step) took a member 1e-7 apart after one epoch
# to 1e-2 after five on one CPU (AMD EPYC; 2e-4 on an Intel Xeon). So the curves are compared in
# float64, where that noise starts 1e9 times smaller: they then agree to the float32 running
# sums of the epoch metrics (measured: 1e-7 to 2e-7 for every case below).
TOLERANCE = 1e-5


def _digits(dtype):
    d = load_digits()
    X = torch.tensor(d.data, dtype=dtype) / 16
    y = torch.tensor(d.target)
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


@pytest.fixture(scope="module")
def digits():
    return _digits(torch.float64)


@pytest.fixture(scope="module")
def digits32():
    return _digits(torch.float32)


MEMBERS = [  # each member's own hyperparameters
    {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.0, "l1": 0.0, "grad_clip": 0.0},
    {"lr": 0.003, "weight_decay": 1e-3, "momentum": 0.9, "l1": 1e-4, "grad_clip": 0.5},
    {"lr": 0.001, "weight_decay": 1e-4, "momentum": 0.5, "l1": 0.0, "grad_clip": 0.0},
]


def _configs(optimizer, schedule="none", nesterov=False, epochs=5, patience=100, members=MEMBERS):
    return [
        TrainConfig(
            optimizer=optimizer,
            nesterov=nesterov,
            batch_size=64,
            lr_schedule=schedule,
            max_epochs=epochs,
            patience=patience,
            seed=11 + i,
            shuffle_seed=11,  # the cohort's batch order: its first member's
            **hp,
        )
        for i, hp in enumerate(members)
    ]


def _models(cfgs, activation="relu", batchnorm=False, widths=(32, 16), dtype=torch.float64):
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_mlp(64, 10, widths, activation, 0.0, batchnorm).to(dtype))
    return models


def _alone(cfgs, data, **kw):
    return [train(m, *data, c).history for m, c in zip(_models(cfgs, **kw), cfgs, strict=True)]


def _worst(alone, fused):
    worst = 0.0
    for a, f in zip(alone, fused, strict=True):
        assert len(a) == len(f)
        for ea, ef in zip(a, f, strict=True):
            for key in ("train_loss", "val_loss"):
                worst = max(worst, abs(ea[key] - ef[key]) / abs(ea[key]))
            assert ea["lr"] == pytest.approx(ef["lr"], rel=1e-6)
    return worst


@pytest.mark.parametrize(
    "optimizer, activation, batchnorm, schedule, nesterov",
    [
        ("sgd", "relu", False, "none", False),
        ("sgd", "tanh", True, "cosine", True),
        ("adam", "relu", False, "none", False),
        ("adam", "prelu", False, "plateau", False),
        # Not batch norm with an adaptive optimizer: the bias before a batch norm gets a gradient
        # of pure rounding noise, which Adam scales up to full steps (and the running mean
        # follows it), so two runs part ways whatever the order of their additions.
        ("adam", "relu", False, "cosine", False),
        ("sgd", "sigmoid", True, "plateau", False),
        ("adamw", "gelu", False, "none", False),
        ("rmsprop", "relu", False, "none", False),
        ("adagrad", "elu", False, "none", False),
        ("nadam", "selu", False, "none", False),
    ],
)
def test_each_member_follows_its_curve_trained_alone(
    digits, optimizer, activation, batchnorm, schedule, nesterov
):
    cfgs = _configs(optimizer, schedule, nesterov)
    alone = _alone(cfgs, digits, activation=activation, batchnorm=batchnorm)
    models = _models(cfgs, activation, batchnorm)
    fused = fit(models, cfgs, *digits)
    assert _worst(alone, [r.history for r in fused]) < TOLERANCE
    # and each model ends holding its kept weights, as `train` leaves it
    for model, result in zip(models, fused, strict=True):
        from hpo.train import evaluate

        kept = evaluate(model, digits[1], cfgs[0])
        assert kept["loss"] == pytest.approx(result.best["val_loss"], rel=1e-5)


def test_bf16_members_follow_their_bf16_curves_alone(digits32):
    """With bf16 products the rounding is coarser, so the curves agree less closely, but a
    member fused still trains as it does alone (measured: 1.1e-2 apart over 5 epochs, where
    bf16 and fp32 runs of one member are 2.5e-2 apart)."""
    cfgs = [replace(c, precision="bf16") for c in _configs("adam")]
    alone = _alone(cfgs, digits32, dtype=torch.float32)
    fused = fit(_models(cfgs, dtype=torch.float32), cfgs, *digits32)
    assert _worst(alone, [r.history for r in fused]) < 5e-2
    fp32 = _alone(_configs("adam"), digits32, dtype=torch.float32)
    assert _worst(fp32, [r.history for r in fused]) > 1e-3  # bf16 products did change them


def test_bf16_members_with_batch_norm_keep_float32_statistics(digits32):
    """Under bf16 autocast the stacked products come out in bfloat16; batch norm's statistics
    and running buffers stay float32, as nn.BatchNorm1d's do, and each member trains as it
    does alone (before, updating the buffers from bfloat16 statistics failed every step)."""
    cfgs = [replace(c, precision="bf16", max_epochs=3) for c in _configs("adam")]
    alone = _alone(cfgs, digits32, batchnorm=True, dtype=torch.float32)
    models = _models(cfgs, batchnorm=True, dtype=torch.float32)
    fused = fit(models, cfgs, *digits32)
    assert [r.failure for r in fused] == [None] * 3
    assert _worst(alone, [r.history for r in fused]) < 5e-2
    for model in models:
        stats = [b for name, b in model.state_dict().items() if "running" in name]
        assert stats and all(b.dtype == torch.float32 and b.isfinite().all() for b in stats)
        assert any(b.abs().max() > 0.1 for b in stats)  # they did move from their start


def test_a_pruned_member_stops_and_the_others_go_on_unchanged(digits):
    cfgs = _configs("adam", epochs=6)
    alone = _alone(cfgs, digits)
    done = []

    def hook(metrics, epoch):
        return {m: "pruned" if m == 1 and epoch == 2 else None for m in metrics}

    fused = fit(_models(cfgs), cfgs, *digits, hook, lambda m, r: done.append(m))
    assert [r.stopped_by for r in fused] == ["max_epochs", "pruned", "max_epochs"]
    assert [len(r.history) for r in fused] == [6, 2, 6]
    assert done == [1, 0, 2]  # handed back as soon as it stopped
    # dropping it from the stack changes nothing for the others, nor its own first epochs
    assert (
        _worst(
            [alone[0], alone[2], alone[1][:2]],
            [fused[0].history, fused[2].history, fused[1].history],
        )
        < TOLERANCE
    )


def test_early_stopping_is_per_member(digits):
    members = [dict(MEMBERS[0]), dict(MEMBERS[2], lr=0.0)]  # the second never improves
    cfgs = _configs("sgd", epochs=8, patience=2, members=members)
    fused = fit(_models(cfgs), cfgs, *digits)
    assert fused[1].stopped_by == "early_stopping" and len(fused[1].history) == 3
    assert fused[1].best_epoch == 1
    assert fused[0].stopped_by == "max_epochs" and len(fused[0].history) == 8


def test_a_non_finite_loss_fails_that_member_only(digits):
    members = [MEMBERS[0], dict(MEMBERS[0], lr=1e12), MEMBERS[2]]
    cfgs = _configs("sgd", epochs=4, members=members)
    alone = _alone([cfgs[0], cfgs[2]], digits)
    fused = fit(_models(cfgs), cfgs, *digits)
    assert fused[1].stopped_by == "diverged"
    assert any(f"train_loss became {x}" in (fused[1].failure or "") for x in ("nan", "inf"))
    assert [fused[0].stopped_by, fused[2].stopped_by] == ["max_epochs", "max_epochs"]
    assert _worst(alone, [fused[0].history, fused[2].history]) < TOLERANCE


def exponential_lr(opt, cfg):
    """A schedule that hpo does not ship: the rate times 0.8 each epoch."""
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    return lambda metrics: sched.step()


def test_a_new_optimizer_and_schedule_are_one_registry_entry_each(digits, monkeypatch):
    """Each member of a cohort is updated by torch's optimizer and schedule over its rows of
    the stack, as a trial alone is: one entry each, and both ways train the same."""
    monkeypatch.setitem(
        OPTIMIZERS._entries, "adamax", Entry("adamax", "torch.optim:Adamax", "Adam, max norm")
    )
    monkeypatch.setitem(
        LR_SCHEDULES._entries,
        "exponential",
        Entry("exponential", "test_fused:exponential_lr", "times 0.8 each epoch"),
    )
    cfgs = _configs("adamax", "exponential", epochs=4)
    alone = _alone(cfgs, digits)
    fused = fit(_models(cfgs), cfgs, *digits)
    assert _worst(alone, [r.history for r in fused]) < TOLERANCE
    for cfg, result in zip(cfgs, fused, strict=True):
        assert [e["lr"] for e in result.history] == pytest.approx(
            [cfg.lr * 0.8**i for i in range(4)]
        )
        assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_members_get_their_own_dropout_masks(digits):
    cfgs = _configs("adam", epochs=1, members=[MEMBERS[0], MEMBERS[0]])
    models = [build_mlp(64, 10, (32, 16), "relu", 0.3).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())  # identical twins but for dropout
    fused = fit(models, cfgs, *digits)
    assert fused[0].history[0]["train_loss"] != fused[1].history[0]["train_loss"]


def test_run_cohort_gives_one_record_per_member(digits):
    spec = parse_spec(small_spec(training={"max_epochs": 3}))
    data = load_data(spec, "cpu")
    base = dict({"n_layers": 1, "width": 32, "batch_size": 64, "optimizer": "sgd"})
    jobs = [
        TrialJob(0, TrialConfig.of(base | {"lr": 1e-2}), seed=1),
        TrialJob(1, TrialConfig.of(base | {"lr": 1e12}), seed=2),  # diverges
        TrialJob(2, TrialConfig.of(base | {"lr": 1e-3}), seed=3),
    ]
    assert len({structure(j.config) for j in jobs}) == 1
    records = []

    run(CohortJob(jobs).trials, spec, data, lambda m, e: {}, records.append)
    by = {r.number: r for r in records}
    assert sorted(by) == [0, 1, 2]
    assert by[1].outcome == "FAIL" and "became" in (by[1].failure or "")
    assert by[0].outcome == by[2].outcome == "COMPLETE"
    assert by[0].weights is not None and by[0].fit is not None and by[0].n_params > 0


def test_a_failure_to_hand_a_record_back_is_the_callers_not_the_trials(digits):
    """`on_done` raising (a worker's channel closed) reaches the caller; it is no trial's
    failure, so no record is handed back for it."""
    spec = parse_spec(small_spec(training={"max_epochs": 2}))
    data = load_data(spec, "cpu")
    job = TrialJob(0, TrialConfig.of({"n_layers": 1, "width": 8}), seed=0)
    handed = []

    def closed(record):
        handed.append(record)
        raise BrokenPipeError("the driver is gone")

    with pytest.raises(BrokenPipeError):
        run(job.trials, spec, data, lambda m, e: {}, closed)
    assert len(handed) == 1 and handed[0].failure is None


def test_a_fused_study_is_trials_like_any_other(workdir, mlflow_uri):
    spec = parse_spec(
        small_spec(
            study={"n_trials": 8, "fused_trials": 4, "pruner": {"name": "none"}},
            tracking={"uri": mlflow_uri, "experiment": "fused"},
        )
    )
    result = study_run(spec)
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    cohorts = {tuple(t.user_attrs["fused_with"]) for t in trials}
    assert cohorts == {(0, 1, 2, 3), (4, 5, 6, 7)}
    for cohort in cohorts:
        members = [trials[n] for n in cohort]
        shapes = {structure(TrialConfig.of(t.user_attrs["config"])) for t in members}
        assert len(shapes) == 1  # one structure per cohort
        assert len({t.params["lr"] for t in members}) == len(cohort)  # its own lr each
        assert len({t.user_attrs["seed"] for t in members}) == len(cohort)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("fused")
    children = [
        r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    ]
    assert len(children) == 8
    assert {r.data.tags["hpo.fused_with"] for r in children} == {"0,1,2,3", "4,5,6,7"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert "test_accuracy" in result.test_metrics  # the best one, fused or not, on test
    assert "fused_with" in trials[result.best_number].user_attrs


def test_ctrl_c_in_the_middle_of_a_cohort_and_a_rerun_finishes_it(workdir):
    spec = small_spec(
        study={"n_trials": 6, "fused_trials": 3, "pruner": {"name": "none"}},
        training={"max_epochs": 300, "early_stopping": {"patience": 300}},  # seconds a cohort
    )
    path = write_spec(workdir, spec)
    proc = hpo_process(["run", path], workdir)
    db = "sqlite:///optuna.db"

    def cohort_running():
        try:
            study = optuna.load_study(study_name="tiny", storage=db)
        except KeyError:
            return False
        running = study.get_trials(states=(TrialState.RUNNING,))
        if len(running) == 3 and all("fused_with" in t.user_attrs for t in running):
            return sorted(t.number for t in running)
        return None

    cohort = wait_for(cohort_running, "a cohort of three running", limit=300, process=proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    study = optuna.load_study(study_name="tiny", storage=db)
    cut = [t for t in study.trials if t.user_attrs.get("interrupted")]
    # the cohort that was training; beside it, any trial its worker held, which never started
    trained = [t for t in cut if t.number in cohort]
    assert len(trained) == 3 and {tuple(t.user_attrs["fused_with"]) for t in trained} == {
        tuple(cohort)
    }
    assert all(not t.intermediate_values for t in cut if t not in trained)

    proc = hpo_process(["run", path], workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="tiny", storage=db)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6 and not study.get_trials(states=(TrialState.RUNNING,))
    again = {t.user_attrs["retry_of"]: t for t in done if "retry_of" in t.user_attrs}
    assert sorted(again) == sorted(t.number for t in cut)  # each cut member ran again
    for t in cut:  # as it was asked for, with its seed
        assert again[t.number].params == t.params
        assert again[t.number].user_attrs["seed"] == t.user_attrs["seed"]
    for t in trained:  # alone, on its cohort's batch order
        assert "fused_with" not in again[t.number].user_attrs
        assert again[t.number].user_attrs["batch_seed"] == t.user_attrs["batch_seed"]


def test_on_a_cpu_wide_nets_train_alone(workdir, mlflow_uri):
    """Stacking does not pay for a net bound by its matrix products: no followers for it."""
    space = {"n_layers": 2, "width": 600, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    spec = parse_spec(
        small_spec(
            search_space=space,
            training={"max_epochs": 1},
            study={"n_trials": 3, "fused_trials": 3},
            tracking={"uri": mlflow_uri, "experiment": "wide"},
        )
    )
    study_run(spec)
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.user_attrs["n_params"] > 250_000 for t in trials)
    assert not [t for t in trials if "fused_with" in t.user_attrs]


def test_workers_and_fused_trials_together(workdir):
    """--workers 2 --fused-trials 2: each cohort trains in one worker process, the study
    counts every member once."""
    spec = small_spec(study={"n_trials": 6, "pruner": {"name": "none"}})
    path = write_spec(workdir, spec)
    proc = hpo_process(["run", path, "--workers", 2, "--fused-trials", 2], workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert out.splitlines()[0].endswith(", up to 2 trials fused a cohort"), out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    cohorts = {tuple(t.user_attrs["fused_with"]) for t in trials}
    assert sorted(n for c in cohorts for n in c) == list(range(6)) and len(cohorts) == 3
    for cohort in cohorts:  # trained together: in one worker process
        assert len({trials[n].user_attrs["worker"] for n in cohort}) == 1
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took a cohort


def test_kill_9_of_a_worker_fails_its_whole_cohort_and_each_member_runs_again(workdir):

    spec = small_spec(
        study={"n_trials": 4, "pruner": {"name": "none"}},
        training={"max_epochs": 400, "early_stopping": {"patience": 400}},
    )
    path = write_spec(workdir, spec)
    proc = hpo_process(["run", path, "--workers", 2, "--fused-trials", 2], workdir)
    db = "sqlite:///optuna.db"

    victim = kill_a_worker_training("tiny", db, alongside=2, process=proc)  # both in a cohort
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="tiny", storage=db)
    cohort = victim.user_attrs["fused_with"]
    for number in cohort:
        lost = study.trials[number]
        assert lost.state == TrialState.FAIL and "died (signal 9)" in lost.user_attrs["lost"]
        again = [t for t in study.trials if t.user_attrs.get("retry_of") == number]
        assert len(again) == 1 and again[0].state == TrialState.COMPLETE
        assert again[0].params == lost.params
    counted = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 4 and not study.get_trials(states=(TrialState.RUNNING,))


def test_closing_while_a_cohort_waits_for_its_answers_does_not_hang(digits):
    """Ctrl-C can land while a worker waits for the answers to its cohort's epochs: the
    'exit' it reads instead stops every member still waiting, and the worker ends."""
    import threading

    from hpo.executors import Done, Epoch
    from hpo.executors.local import ThreadExecutor

    spec = parse_spec(small_spec(training={"max_epochs": 50, "early_stopping": {"patience": 50}}))
    data = load_data(spec, "cpu")
    base = {"n_layers": 1, "width": 16, "batch_size": 64}
    jobs = [TrialJob(n, TrialConfig.of(base | {"lr": 1e-3 * (n + 1)}), seed=n) for n in range(3)]
    executor = ThreadExecutor(spec, "cpu")
    executor.start(data)
    executor.ready()
    executor.submit(CohortJob(jobs))
    epochs: list = []
    while len(epochs) < 3:  # the cohort's first epoch, reported for each member
        epochs += [e for e in executor.wait(1.0) if isinstance(e, Epoch)]
    executor.decide(epochs[0].number, None)  # one answer of three, then Ctrl-C
    closing = threading.Thread(target=executor.close, kwargs={"interrupt": True})
    closing.start()
    closing.join(timeout=120)
    assert not closing.is_alive(), "the worker still waits for answers"
    done = [e for e in executor._outbox.queue if isinstance(_event_of(e), Done)]
    assert sorted(_event_of(e).number for e in done) == [0, 1, 2]
    assert all(_event_of(e).record.stopped_by == "interrupted" for e in done)


def _event_of(message):
    from hpo.executors.local import _event

    return _event(message)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_members_with_and_without_dropout_share_a_cohort(digits, batchnorm):
    """Dropout 0 builds no Dropout module, so the members' layers sit at other indices: the
    stack matches tensors by role, and each member ends with its own model's names."""
    # sgd: with batch norm an adaptive optimizer turns rounding noise into steps (see above)
    cfgs = _configs("sgd", epochs=2, members=[MEMBERS[0], MEMBERS[2]])
    models = []
    for cfg, rate in zip(cfgs, (0.0, 0.3), strict=True):
        torch.manual_seed(cfg.seed)
        models.append(build_mlp(64, 10, (32, 16), "relu", rate, batchnorm).double())
    assert set(models[0].state_dict()) != set(models[1].state_dict())
    alone = _alone(cfgs[:1], digits, batchnorm=batchnorm)
    fused = fit(models, cfgs, *digits)
    assert [r.stopped_by for r in fused] == ["max_epochs", "max_epochs"]
    assert _worst(alone, [fused[0].history]) < TOLERANCE  # the one without dropout, as alone
    rebuilt = build_mlp(64, 10, (32, 16), "relu", 0.3, batchnorm)
    rebuilt.load_state_dict(models[1].state_dict())  # its own names: loads into its own shape
    if batchnorm:  # the steps batch norm counted, as a model trained alone counts them
        [alone_model] = _models(cfgs[:1], batchnorm=True)
        train(alone_model, *digits, cfgs[0])
        counts = [
            [int(m.num_batches_tracked) for m in model.modules() if hasattr(m, "momentum")]
            for model in (alone_model, models[0], models[1])
        ]
        assert counts[0] == counts[1] == counts[2] and counts[0][0] > 0


def test_a_follower_of_another_shape_waits_for_a_free_slot(workdir, mlflow_uri):
    """batchnorm is asked only when init is he: a follower that draws he where its leader
    drew default gets another shape. It trains alone, after the cohort, in the one slot."""
    space = {
        "n_layers": 1,
        "width": 16,
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "init": {"type": "categorical", "choices": ["default", "he"]},
        "batchnorm": {"type": "categorical", "choices": [True, False], "when": {"init": ["he"]}},
    }
    spec = parse_spec(
        small_spec(
            search_space=space,
            training={"max_epochs": 2},
            # seed 1: trial 2 draws he (and batch norm) where its leader, trial 0, drew default
            study={"n_trials": 9, "fused_trials": 3, "sampler": {"name": "random", "seed": 1}},
            tracking={"uri": mlflow_uri, "experiment": "shapes"},
        )
    )
    study_run(spec)
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert len(trials) == 9 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        mates = t.user_attrs.get("fused_with", [t.number])
        shapes = {structure(TrialConfig.of(trials[n].user_attrs["config"])) for n in mates}
        assert len(shapes) == 1
    # the case this test is for happened: a trial asked as a follower trained alone
    assert [t.number for t in trials if "fused_with" not in t.user_attrs] == [2]
    assert trials[0].user_attrs["fused_with"] == [0, 1]
