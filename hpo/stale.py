"""Trials whose process died: failed, their configuration queued to run again once, their
tracker runs closed.

The heartbeat check (`hpo.storage.fail_stale_trials`) fails the running trials of any process
whose heartbeat went silent, on any machine, and calls `StaleTrials.on_stale` for each; a dead
`hpo run` on this machine is noticed at once by its process id (`fail_dead_here`); and tracker
runs left open by a process that lost its tracking server are closed on the next start.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import queued_params, storage_of, trial_id
from hpo.outcomes import FINISHED, retry_attrs, was_interrupted
from hpo.tracker import Tracker
from hpo.tracking import STATUS


def queue_again(study: optuna.Study, trial: optuna.Trial | FrozenTrial, kills: int) -> None:
    """Queue a cut-short trial's configuration to run again (`retry_attrs`)."""
    study.enqueue_trial(
        trial.params, user_attrs=retry_attrs(trial.number, trial.user_attrs, kills)
    )


def fail_orphans(study: optuna.Study, trials: list[FrozenTrial]) -> bool:
    """Fail the trials whose process died as it asked for them: RUNNING without the `driver`
    attribute, which the process that asks writes before it lets go of the storage's lock.
    Call it holding that lock: whoever asked for them is gone. They are marked interrupted
    (not counted); one taken from the queue (a retry, a baseline) is queued again as it was,
    a fresh one was never sampled and has nothing to run again. True when one was failed."""
    storage, failed = storage_of(study), False
    for t in trials:
        if t.state != TrialState.RUNNING or "driver" in t.user_attrs:
            continue
        try:
            storage.set_trial_user_attr(trial_id(t), "lost", "its process died as it asked for it")
            storage.set_trial_user_attr(trial_id(t), "interrupted", True)
            if not storage.set_trial_state_values(trial_id(t), TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed = True
        params = queued_params(t)
        if params or t.user_attrs:
            study.enqueue_trial(params, user_attrs=dict(t.user_attrs))
    return failed


class StaleTrials:
    """What one driver does about other processes' dead trials; `me`: its `process_id`."""

    def __init__(self, tracker: Tracker, me: str):
        self.tracker, self.me = tracker, me

    def on_stale(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        """A trial of a dead process, just failed by the heartbeat check in this process."""
        kills = frozen.user_attrs.get("kills", 0)
        if kills < 1:
            queue_again(study, frozen, kills + 1)
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id:
            self.tracker.close_run(run_id, "KILLED", "KILLED" if kills < 1 else "FAIL")

    def fail_dead_here(self, study: optuna.Study) -> None:
        """Fail at once the running trials of a dead `hpo run` on this machine (killed, or
        stopped after losing its storage), rather than after the heartbeat's grace period."""
        storage = storage_of(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            driver = t.user_attrs.get("driver")
            if not driver or driver == self.me or not dead_here(driver):
                continue
            try:
                storage.set_trial_user_attr(trial_id(t), "lost", f"its hpo run {driver} died")
                failed = storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process got there first
            if failed:
                self.on_stale(study, storage.get_trial(trial_id(t)))

    def close_runs_of_finished_trials(self, study: optuna.Study) -> None:
        """Close the tracker runs left RUNNING for trials that have finished: their process
        lost the tracking server between telling Optuna and closing the run."""
        open_runs = self.tracker.running_trial_runs()
        if not open_runs:
            return
        finished = {t.number: t for t in study.get_trials(deepcopy=False, states=FINISHED)}
        for run_id, number in open_runs.items():
            t = finished.get(number)
            if t is not None:
                state = "KILLED" if was_interrupted(t) else t.state.name
                self.tracker.close_run(run_id, STATUS[state], state)


def process_id(pid: int) -> str:
    """host:pid:start, naming one process for good (a reused pid has another start time)."""
    try:  # field 22 of /proc/PID/stat, counted after the command name in parentheses
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{socket.gethostname()}:{pid}:{start}"


def dead_here(driver: str) -> bool:
    """Whether the process a `process_id` names ran on this machine and is gone."""
    host, pid, start = driver.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return start != "?" and process_id(int(pid)) != driver
