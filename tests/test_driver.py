"""The driver's decisions (hpo.study), unit-tested: the real driver loop and a real Optuna
storage (a SQLite file), with a fake executor that trains nothing and a tracker that records
what it is asked (no MLflow): the budget, ties for the best, a lost worker, a retry, Ctrl-C."""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

import optuna
import pytest
import torch
from conftest import small_spec
from optuna.trial import TrialState

from hpo.config import parse_spec
from hpo.executors import Done, Epoch, Lost, Started
from hpo.params import TrialConfig
from hpo.reports.data import report_data
from hpo.space import structure
from hpo.storage import GRACE_S
from hpo.study import run_study
from hpo.trial import TrialRecord, build_model


class RecordingTracker:
    """A `hpo.tracker.Tracker` that keeps in memory what the driver asks of it."""

    def __init__(self):
        self.uri = ""
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.retry = None
        self.runs: dict[str, dict[str, Any]] = {}  # run id -> number, state, epochs, ...
        self.checkpoints: dict[str, dict[str, torch.Tensor]] = {}
        self.summary: dict[str, Any] = {}
        self.models: list[str | None] = []  # the run each model was logged to (None: parent)
        self.registered: list[tuple[str, str, str]] = []  # model URI, name, alias
        self.parent_status: str | None = None

    def check(self):
        pass

    def open(self):
        self.experiment_id = "0"

    def open_parent(self, run_id, name, params, tags):
        self.parent_id = run_id or "parent"
        return self.parent_id

    def close_parent(self, status="FINISHED"):
        self.parent_status = status

    def log_text(self, text, name):
        pass

    def log_summary(self, metrics, tags):
        self.summary |= metrics | tags

    def start_trial(self, number, tags=None):
        run_id = f"run-{len(self.runs)}"
        self.runs[run_id] = {"number": number, "state": "RUNNING", "epochs": [], "tags": tags}
        return run_id

    def log_epoch(self, run_id, epoch, metrics):
        self.runs[run_id]["epochs"].append(epoch)

    def flush(self, due_only=False, run_id=None):
        pass

    def end_trial(self, run_id, state, params, final, tags=None):
        self.runs[run_id].update(state=state, params=params, metrics=final)

    def close_run(self, run_id, status="KILLED", state="KILLED"):
        self.runs[run_id]["state"] = state

    def running_trial_runs(self):
        return {r: v["number"] for r, v in self.runs.items() if v["state"] == "RUNNING"}

    def save_checkpoint(self, run_id, state_dict, config):
        self.checkpoints[run_id] = state_dict

    def load_checkpoint(self, run_id):
        return self.checkpoints[run_id]

    def log_model(self, predictor, input_example, run_id=None, name="model"):
        self.models.append(run_id)
        return f"models:/{len(self.models)}"

    def register_model(self, uri, name, alias):
        self.registered.append((uri, name, alias))
        return f"models:/{name}@{alias}", str(len(self.registered))

    def fail_pending_models(self):
        return 0

    def numbers(self, state: str) -> list[int]:
        return sorted(v["number"] for v in self.runs.values() if v["state"] == state)


class FakeExecutor:
    """An `hpo.executors.Executor` that trains nothing: each trial reports `epochs` epochs of
    `value(config)` and ends with weights of the right shape. `order` picks which running trial
    moves next (`min`: the lowest number first, `max`: the highest); `lose` names trials whose
    worker dies at their first epoch, once; `ctrl_c_after` raises KeyboardInterrupt in `wait`
    once that many trials have ended."""

    description = "a fake executor"

    def __init__(self, slots=2, epochs=2, value=lambda config: 0.9, order=min, lose=(),
                 ctrl_c_after=None):  # fmt: skip
        self.slots, self.epochs, self.value, self.order = slots, epochs, value, order
        self.lose, self.ctrl_c_after = set(lose), ctrl_c_after
        self.running: dict[int, dict[str, Any]] = {}  # number -> job, epochs done, waiting
        self.ended = 0
        self.submitted: list[list[int]] = []
        self.closed = False

    def adapt(self, spec, data):
        return spec

    def start(self, data):
        self.data = data

    def ready(self):
        pass

    def submit(self, job):
        self.submitted.append(job.numbers)
        for member in job.trials:
            self.running[member.number] = {"job": member, "epoch": 0, "waiting": False,
                                           "started": False, "stop": None,
                                           "of": job.numbers[0]}  # fmt: skip

    def cancel(self):
        """The jobs not started, taken back."""
        jobs = {r["of"] for r in self.running.values()}
        started = {r["of"] for r in self.running.values() if r["started"]}
        numbers = [n for n, r in self.running.items() if r["of"] in jobs - started]
        for n in numbers:
            del self.running[n]
        return numbers

    def wait(self, timeout):
        if self.ctrl_c_after is not None and self.ended >= self.ctrl_c_after:
            self.ctrl_c_after = None
            raise KeyboardInterrupt
        # As a real executor: at most `slots` jobs train; the others are held until one ends.
        training = {r["of"] for r in self.running.values() if r["started"]}
        free = self.slots - len(training)
        held = sorted({r["of"] for r in self.running.values() if not r["started"]})[:free]
        ready = [
            n for n, r in self.running.items()
            if not r["waiting"] and (r["of"] in training or r["of"] in held)
        ]  # fmt: skip
        if not ready:
            return []
        number = self.order(ready)
        r = self.running[number]
        if not r["started"]:
            r["started"] = True
            return [Started(number, "fake:1")]
        job = r["job"]
        if number in self.lose:
            self.lose.discard(number)
            del self.running[number]
            self.ended += 1
            return [Lost(number, "its worker died")]
        if r["stop"] is None and r["epoch"] < self.epochs:
            r["epoch"] += 1
            r["waiting"] = True
            return [Epoch(number, r["epoch"], self._metrics(job.config))]
        del self.running[number]
        self.ended += 1
        return [Done(number, self._record(job, r))]

    def _metrics(self, config):
        v = self.value(config)
        return {"train_loss": 0.3, "val_loss": 0.3, "train_accuracy": v, "val_accuracy": v}

    def _record(self, job, r):
        history = [self._metrics(job.config) for _ in range(r["epoch"])]
        record = TrialRecord(job.number, job.config, job.seed, history=history)
        record.stopped_by = r["stop"] or "max_epochs"
        if record.outcome == "COMPLETE":
            record.kept_epoch = len(history)
            model = build_model(job.config, self.data, "cpu")
            record.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return record

    def decide(self, number, decision):
        r = self.running.get(number)
        if r is not None:
            r["waiting"], r["stop"] = False, decision

    def close(self, interrupt=False):
        self.closed = True
        if interrupt:
            self.running.clear()


def _spec(**study):
    return parse_spec(
        small_spec(
            training={"max_epochs": 2},
            study={"n_trials": 5, **study},
            tracking={"log_model": "best"},
        )
    )


def _run(tmp_path, spec, executor, tracker=None, **kw):
    tracker = tracker or RecordingTracker()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_study(spec, tracker, executor, storage=storage, **kw)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    return result, study, tracker


@pytest.mark.parametrize("slots", [1, 3])
def test_the_budget_is_exact_and_every_trial_has_its_closed_run(tmp_path, slots):
    spec = _spec(n_trials=5)
    result, study, tracker = _run(tmp_path, spec, FakeExecutor(slots=slots))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert result.counts["COMPLETE"] == 5 and not result.interrupted
    assert tracker.numbers("COMPLETE") == [0, 1, 2, 3, 4]
    assert all(r["epochs"] == [1, 2] for r in tracker.runs.values())
    assert tracker.parent_status == "FINISHED"


@pytest.mark.parametrize("order", [min, max], ids=["lowest first", "highest first"])
def test_ties_name_one_best_trial_everywhere_whichever_finishes_first(tmp_path, order):
    """Every trial ties at 0.9: the best is trial 0, the lowest number, whether it finished
    first or last; its weights were kept, the test and the model are its, and the summary
    and the report say so."""
    spec = _spec(n_trials=3)
    result, study, tracker = _run(tmp_path, spec, FakeExecutor(slots=3, order=order))
    assert [t.value for t in study.trials] == [0.9] * 3
    assert result.best_number == 0
    assert study.user_attrs["test_trial"] == study.user_attrs["model_trial"] == 0
    assert tracker.summary["hpo.best_trial"] == 0 and result.test_metrics
    run_of_0 = study.trials[0].user_attrs["mlflow_run_id"]
    assert run_of_0 in tracker.checkpoints and tracker.models == [None]  # on the parent run
    assert report_data(study).overview.best_number == 0


def test_a_better_trial_later_becomes_the_best_and_is_the_one_tested(tmp_path):
    spec = _spec(n_trials=4)
    value = lambda config: config.lr  # noqa: E731 - the largest rate wins
    result, study, tracker = _run(tmp_path, spec, FakeExecutor(value=value))
    best = max(study.trials, key=lambda t: t.value)
    assert result.best_number == best.number == study.user_attrs["test_trial"]


def test_a_lost_worker_fails_its_trial_which_runs_again_and_the_budget_holds(tmp_path):
    spec = _spec(n_trials=3)
    result, study, tracker = _run(tmp_path, spec, FakeExecutor(lose={1}))
    lost = study.trials[1]
    assert lost.state == TrialState.FAIL and lost.user_attrs["lost"] == "its worker died"
    [again] = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert again.state == TrialState.COMPLETE and again.params == lost.params
    assert again.user_attrs["seed"] == lost.user_attrs["seed"]  # trains as the lost one would
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and result.counts["COMPLETE"] == 3
    assert tracker.runs[lost.user_attrs["mlflow_run_id"]]["state"] == "KILLED"


def test_a_worker_lost_twice_on_one_configuration_fails_it_for_good(tmp_path):
    spec = _spec(n_trials=2)
    executor = FakeExecutor(slots=1, lose={1})
    original = executor.submit

    def submit(job):  # the retry of trial 1 is lost too
        if any(m.number >= 2 for m in job.trials):
            executor.lose.add(job.numbers[0])
        original(job)

    executor.submit = submit
    result, study, tracker = _run(tmp_path, spec, executor)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                                TrialState.FAIL]  # fmt: skip
    assert "a second time: not run again" in study.trials[2].user_attrs["fail_reason"]
    assert not [t for t in study.trials if t.user_attrs.get("retry_of") == 2]


def test_ctrl_c_interrupts_the_running_trials_and_a_rerun_finishes_the_budget(tmp_path):
    spec = _spec(n_trials=6)
    turns = itertools.count()  # the two workers take turns: both trials start
    executor = FakeExecutor(slots=2, ctrl_c_after=1, order=lambda ready: ready[next(turns) % 2])
    result, study, tracker = _run(tmp_path, spec, executor)
    assert result.interrupted
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    # those a worker held and had not started have no run to close; the other one's is killed
    started = [t for t in interrupted if "mlflow_run_id" in t.user_attrs]
    assert len(started) == 1 and len(interrupted) > 1
    assert all(tracker.runs[t.user_attrs["mlflow_run_id"]]["state"] == "KILLED"
               for t in started)  # fmt: skip
    assert len(tracker.runs) == len(started) + 1  # and the one that finished
    assert tracker.parent_status == "KILLED"
    result, study, _ = _run(tmp_path, spec, FakeExecutor(slots=2))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and not result.interrupted
    for t in interrupted:  # each configuration ran again, with its seed
        [again] = [c for c in complete if c.user_attrs.get("retry_of") == t.number]
        assert again.params == t.params and again.user_attrs["seed"] == t.user_attrs["seed"]


@pytest.mark.parametrize("heartbeat", ["none", "past its grace period"])
def test_trials_whose_process_died_as_it_asked_for_them_are_failed_and_a_queued_one_kept(
    tmp_path, heartbeat
):
    """A process killed between Optuna's ask and its own attributes leaves a RUNNING trial no
    process names; the next process, holding the storage's lock, knows its asker is gone, and
    says so before the heartbeat check (which knows no reason) fails one whose heartbeat the
    dead process had written."""
    spec = _spec(n_trials=3)
    result, study, _ = _run(tmp_path, _spec(n_trials=1), FakeExecutor(slots=1))
    first = study.trials[0]
    study.enqueue_trial(first.params, user_attrs={"retry_of": 0, "seed": 5})
    queued, fresh = study.ask(), study.ask()  # RUNNING, and nobody's
    if heartbeat != "none":
        db = tmp_path / "optuna.db"
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}", heartbeat_interval=1)
        for t in (queued, fresh):
            storage.record_heartbeat(t._trial_id)
        with sqlite3.connect(db) as con:
            age = f"-{GRACE_S + 60} seconds"
            con.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (age,))
    result, study, _ = _run(tmp_path, spec, FakeExecutor(slots=1))
    for t in (study.trials[queued.number], study.trials[fresh.number]):
        assert t.state == TrialState.FAIL and t.user_attrs["interrupted"]
        assert t.user_attrs["lost"] == "its process died as it asked for it"
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == 0]
    assert [t.number for t in retries][0] == queued.number and len(retries) == 2
    again = retries[1]  # queued again as it was
    assert again.state == TrialState.COMPLETE and again.user_attrs["seed"] == 5
    assert again.params == first.params
    assert result.counts["COMPLETE"] == 3 and result.counts["INTERRUPTED"] == 2


def test_fused_trials_go_to_the_executor_as_cohorts_of_one_shape(tmp_path):
    spec = _spec(n_trials=6, fused_trials=3)
    executor = FakeExecutor(slots=1)
    result, study, tracker = _run(tmp_path, spec, executor)
    assert executor.submitted == [[0, 1, 2], [3, 4, 5]]
    for numbers in executor.submitted:
        configs = [study.trials[n].user_attrs["config"] for n in numbers]
        assert len({structure(TrialConfig.of(c)) for c in configs}) == 1
        assert all(study.trials[n].user_attrs["fused_with"] == numbers for n in numbers)
    assert result.counts["COMPLETE"] == 6


def _record(stopped_by="max_epochs", value=0.9, **kw):
    history = [{"train_loss": 0.4, "val_loss": 0.5, "val_accuracy": value}]
    return TrialRecord(3, None, 0, history=history, stopped_by=stopped_by, kept_epoch=1, **kw)


@pytest.mark.parametrize(
    "record, state, value, run_state, retry",
    [
        (_record(), TrialState.COMPLETE, 0.9, "COMPLETE", False),
        (_record(value=float("nan")), TrialState.FAIL, None, "FAIL", False),
        (_record("pruned"), TrialState.PRUNED, None, "PRUNED", False),
        (_record("diverged", failure="train_loss became nan"), TrialState.FAIL, None, "FAIL",
         False),
        (_record("interrupted"), TrialState.FAIL, None, "KILLED", True),
    ],
)  # fmt: skip
def test_what_a_finished_record_becomes(record, state, value, run_state, retry):
    from hpo.objectives import Objectives
    from hpo.outcomes import settle

    settled = settle(record, Objectives.single("val_accuracy", "maximize"), fused_with=[3, 4])
    told = None if value is None else [value]
    assert (settled.state, settled.values, settled.run_state, settled.retry) == (
        state, told, run_state, retry
    )  # fmt: skip
    assert settled.tags["hpo.fused_with"] == "3,4"
    if state == TrialState.COMPLETE:
        assert settled.attrs["metrics"] == record.history[0] and settled.final["best_epoch"] == 1
    if state == TrialState.FAIL and not retry:
        assert settled.attrs["fail_reason"] == settled.tags["hpo.fail_reason"]
        reasons = ("train_loss became nan", "val_accuracy is not finite at the kept epoch")
        assert settled.attrs["fail_reason"] in reasons


def test_a_lost_trial_runs_again_once_and_a_retry_repeats_its_seed():
    from hpo.outcomes import retry_attrs, settle_lost

    first, second = settle_lost("killed", 0), settle_lost("killed", 1)
    assert (first.retry, first.run_state, first.attrs["lost"]) == (True, "KILLED", "killed")
    assert (second.retry, second.run_state) == (False, "FAIL")
    assert "a second time" in second.attrs["fail_reason"]
    attrs = retry_attrs(7, {"seed": 11, "batch_seed": 5, "baseline": "mlp", "other": 1}, 1)
    assert attrs == {"retry_of": 7, "kills": 1, "seed": 11, "batch_seed": 5, "baseline": "mlp"}


@pytest.mark.parametrize(
    "value, number, best, keep, is_best",
    [
        (0.9, 0, None, True, True),  # the first complete trial
        (0.95, 5, (0.9, 2), True, True),  # better
        (0.9, 5, (0.9, 2), True, False),  # ties a best with a lower number: kept, not best
        (0.9, 1, (0.9, 2), True, True),  # ties a best with a higher number: the best now
        (0.8, 5, (0.9, 2), False, False),  # worse
    ],
)
def test_the_checkpoint_policy_keeps_every_trial_that_is_or_ties_the_best(
    value, number, best, keep, is_best
):
    from hpo.objectives import Objectives
    from hpo.outcomes import as_frozen, checkpoint_policy

    up, down = (
        Objectives.single("val_accuracy", "maximize"),
        Objectives.single("val_loss", "minimize"),
    )
    others = [] if best is None else [as_frozen(best[1], {}, [best[0]])]
    me = as_frozen(number, {}, [value])
    got = checkpoint_policy(me, others, up, log_all=False, baseline=False)
    assert got == (keep, is_best)
    # every trial's model logged, or a baseline: kept whatever its value
    assert checkpoint_policy(me, others, up, log_all=True, baseline=False)[0]
    assert checkpoint_policy(me, others, up, log_all=False, baseline=True)[0]
    # minimizing: the same order, the other way
    low = checkpoint_policy(as_frozen(number, {}, [-value]), _negated(others), down,
                            log_all=False, baseline=False)  # fmt: skip
    assert low == (keep, is_best)


def _negated(trials):
    from hpo.outcomes import as_frozen

    return [as_frozen(t.number, {}, [-t.values[0]]) for t in trials]


def test_a_tracking_server_lost_at_a_checkpoint_leaves_its_trial_interrupted_not_running(
    tmp_path,
):
    """The server goes away as a finished trial's weights are saved: the trial cannot keep
    them, so it is interrupted (told, queued to run again) as the run stops, not left RUNNING
    for another process to find."""
    from hpo.outage import ServerLost

    class LostAtCheckpoint(RecordingTracker):
        def save_checkpoint(self, run_id, state_dict, config):
            raise ServerLost("tracking server", "http://t", 0.0, ConnectionError("refused"))

        def end_trial(self, run_id, state, params, final, tags=None):
            raise ServerLost("tracking server", "http://t", 0.0, ConnectionError("refused"))

    spec = _spec(n_trials=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ServerLost):
        run_study(spec, LostAtCheckpoint(), FakeExecutor(slots=1), storage=storage)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    first = study.trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["retry_of"] for t in waiting if t.user_attrs["retry_of"] == 0] == [0]
