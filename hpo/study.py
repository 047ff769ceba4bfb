"""The driver: ask -> run -> tell over an executor, resume, the test.

`run_study` asks Optuna for trials, hands them to an executor (`hpo.executors`), answers each
epoch with a pruning decision, tells Optuna the outcome, stores the trial's record once and
hands it to the tracker it was given. Several drivers (processes, machines) can share a study:
what must happen once happens under the storage's lock (`hpo.storage`). The driver
sequences decisions made elsewhere: samplers and pruners (`hpo.search`), what can refuse a run
(`hpo.preflight`), what a finished record becomes and which trial is the best
(`hpo.outcomes`); it reaches MLflow only through a `hpo.tracker.Tracker`.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.pruners import NopPruner
from optuna.trial import FrozenTrial, TrialState

from hpo import __version__, resources
from hpo._private import GRID_STOPPED, RecentTrials, storage_of, trial_id
from hpo.config import Spec, SpecError
from hpo.data import Data, load_data, resolve_device
from hpo.executors import Done, Epoch, Executor, Lost, Started
from hpo.final import Final
from hpo.objectives import ATTR as OBJECTIVES
from hpo.objectives import Objectives, primary
from hpo.outage import RETRY_S, Retry, ServerLost, uncut
from hpo.outcomes import (
    Settled,
    as_frozen,
    best_or_none,
    budget_used,
    checkpoint_policy,
    count_finished,
    searched_finished,
    settle,
    settle_lost,
    state_counts,
    stop_reason,
)
from hpo.params import TrialConfig
from hpo.preflight import check_memory, refuse_changed_spec, resolve_storage, stored_yaml
from hpo.redact import redact_url
from hpo.results import (
    Bookkeeping,
    EpochProgress,
    Progress,
    StudyResult,
    progress_of,
    result_of,
)
from hpo.search import (
    FirstObjective,
    check_spec,
    curve_of,
    enqueue_baselines,
    make_pruner,
    make_sampler,
    prune_window,
)
from hpo.space import is_structural, leads_a_cohort, structure, suggest_params
from hpo.stale import StaleTrials, fail_orphans, process_id, queue_again
from hpo.storage import (
    DEFAULT_STORAGE,
    GRACE_S,
    HEARTBEAT_S,
    at_rest,
    check_storage_writable,
    fail_stale_trials,
    has_lock,
    open_storage,
    set_user_attrs,
    storage_lock,
)
from hpo.tracker import Tracker
from hpo.train import evaluate, flush_denormals, precision_warning, train
from hpo.trial import SEED_STEP, CohortJob, TrialJob, TrialRecord, build_model, train_config
from hpo.warm import STUDY_ATTR as WARM_STARTED
from hpo.warm import check_sources, warm_start

__all__ = ["DEFAULT_STORAGE", "GRACE_S", "HEARTBEAT_S", "open_storage", "run_study"]
POLL_S = 1.0  # how often an idle driver looks at the storage again
LATER_S = 0.05  # the longest what can wait (`_Driver.later`) waits for a pause in messages
CLEANUP_RETRY_S = 10.0  # after Ctrl-C, how long a lost server is waited for while cleaning up
NOISE_SEEDS = 2  # more seeds the best trains with to measure the seed noise (`_seed_noise`)


# ---------------------------------------------------------------- running a study


def run_study(
    spec: Spec,
    tracker: Tracker,
    executor: Executor | None = None,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    seed: int | None = None,
    on_trial_end: Callable[[Progress], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[EpochProgress], None] | None = None,
    retry_s: float = RETRY_S,
    on_notice: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run (or join, or resume) the study a spec describes on `executor`'s workers; the last
    process out evaluates the best model once on the test split.

    Ctrl-C stops it cleanly: running trials are interrupted (they do not count and their
    configurations run again), the test evaluation still runs when no other process is
    training, every MLflow run is closed, and `StudyResult.interrupted` is set.

    A database or tracking server that goes away mid-study is retried for `retry_s` seconds
    (`on_notice` hears when it goes and comes back); past that the run stops the same way and
    raises `ServerLost`.
    """
    from hpo.executors.local import ThreadExecutor

    name = study_name or spec.name
    url = resolve_storage(spec, storage)
    check_spec(spec)  # the sampler's and pruner's options, before anything is written
    pruner = make_pruner(spec)
    flush_denormals()  # before the data's first torch operation starts the intra-op threads
    device = resolve_device(spec.training.device)
    data = load_data(spec, device)
    executor = executor or ThreadExecutor(spec, str(device))

    # Everything that can refuse the run does so before the study or any run is written.
    given = (
        "--storage" if storage else "HPO_STORAGE" if os.environ.get("HPO_STORAGE") else
        "study.storage" if spec.study.storage else "storage"
    )  # fmt: skip
    check_storage_writable(url, given)
    tracker.check()
    spec = executor.adapt(spec, data)  # the cohort size and workers, when chosen for the user
    devices = getattr(executor, "devices", [str(device)])
    check_memory(spec, data, devices)
    for dev in sorted(set(devices)):
        slow = precision_warning(spec.training.precision, torch.device(dev))
        if slow and on_notice is not None:
            on_notice(slow)
    fingerprints = spec.fingerprints()
    sources = spec.study.warm_start
    driver = _Driver(spec, name, url, tracker, data, executor)
    driver.retry = Retry("Optuna storage", url, retry_s, on_notice)
    opened = open_storage(url, heartbeat=True, on_stale=driver.stale.on_stale, retry=driver.retry)
    stored = refuse_changed_spec(opened, url, name, fingerprints, data.info)
    if sources:
        check_sources(opened, name, sources)
    if seed is None:
        seed = stored.get("seed")  # a resumed study keeps the --seed it started with
    # The workers load their data and warm up while the stores open (driver.run waits for
    # them, and closes them however it ends).
    executor.start(data)
    try:
        tracker.open()
        tracker.retry = Retry("tracking server", tracker.uri, retry_s, on_notice)
        with storage_lock(url, driver.lock_key, driver.retry):
            study = optuna.create_study(
                study_name=name,
                storage=opened,
                pruner=pruner,
                directions=list(driver.objectives.directions),
                load_if_exists=True,
            )
            names = list(driver.objectives.names)
            if study.metric_names != names:  # optuna-dashboard's axis titles
                with warnings.catch_warnings():  # experimental since optuna 3.2
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(names)
            attrs = study.user_attrs
            stored_objectives = driver.objectives.as_attr()  # `select` may change between runs
            wanted = not driver.objectives.plain or OBJECTIVES in attrs
            if wanted and attrs.get(OBJECTIVES) != stored_objectives:
                study.set_user_attr(OBJECTIVES, stored_objectives)
            if "spec_hash" not in attrs:
                for k, v in {
                    "spec_hash": fingerprints[0],
                    "hpo_version": __version__,
                    "metric": spec.study.metric,
                    "data": data.info,
                    "spec_yaml": stored_yaml(spec),
                    "spec_dir": str(Path(spec.source_dir).resolve()),
                    "seed": seed,  # the --seed override, if any
                }.items():
                    study.set_user_attr(k, v)
            # Each process that drives the study gets its own sampler stream: two processes with
            # one seed would propose the same configurations, and a resumed one would replay them.
            starts = int(attrs.get("driver_starts", 0))
            study.set_user_attr("driver_starts", starts + 1)
            sampler_seed = seed if seed is not None else spec.study.sampler.seed
            if sampler_seed is not None:
                sampler_seed = (sampler_seed + 1_000_003 * starts) % 2**32  # Optuna's range
            study.sampler = make_sampler(spec, seed=sampler_seed)
            parent_id = tracker.open_parent(
                attrs.get("mlflow_parent_run_id"),
                name,
                params={
                    "dataset": spec.dataset.name,
                    "task": data.task,
                    "metric": spec.study.metric,
                    "sampler": spec.study.sampler.name,
                    "pruner": spec.study.pruner.name,
                    "n_trials": spec.study.n_trials,
                    "max_epochs": spec.training.max_epochs,
                    **{f"split.{k}": v for k, v in data.info.items() if k.startswith("n_")},
                    "split.hash": data.info["split_hash"],
                },
                tags={
                    "hpo.study": name,
                    "hpo.storage": redact_url(url),
                    "hpo.spec_hash": fingerprints[0],
                },
            )
            if attrs.get("mlflow_parent_run_id") != parent_id:
                study.set_user_attr("mlflow_parent_run_id", parent_id)
                study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
                study.set_user_attr("tracking_uri", redact_url(tracker.uri))
                tracker.log_text(stored_yaml(spec), "spec.yaml")
            driver.stale.close_runs_of_finished_trials(study)
            if sources and (added := warm_start(study, spec, data.info, sources, spec_of)):
                told = "; ".join(f"{k}: {v['added']} trials" for k, v in added.items())
                tracker.log_summary({}, {"hpo.warm_start_from": told})
            enqueue_baselines(study, spec)
        base_seed = seed if seed is not None else (spec.study.sampler.seed or 0)
        return driver.run(study, base_seed, on_start, on_trial_end, on_epoch)
    except BaseException:
        executor.close(interrupt=True)
        raise
    finally:
        at_rest(opened, url)


@dataclass
class _Running:
    """A trial this process is training: its Optuna handle, MLflow run and curve so far."""

    trial: optuna.Trial
    run_id: str | None  # None until its MLflow run is created
    config: TrialConfig | None  # None until sampled (or when sampling failed)
    history: list[dict[str, float]] = field(default_factory=list)
    pruned: bool = False  # the driver answered one of its epochs "pruned"


class _Driver:
    """Ask -> run -> tell for one process, over its executor's workers."""

    def __init__(
        self, spec: Spec, name: str, url: str, tracker: Tracker, data: Data, executor: Executor
    ):
        self.spec, self.name, self.url = spec, name, url
        self.tracker, self.data, self.executor = tracker, data, executor
        self.metric = spec.study.metric
        self.objectives = Objectives.of_spec(spec)
        self.total = spec.study.n_trials
        self.lock_key = f"hpo:study:{name}"
        self.study: optuna.Study = None  # type: ignore[assignment]  # set by run
        self.base_seed = 0
        self.running: dict[int, _Running] = {}
        self.cohort_of: dict[int, int] = {}  # a fused trial's number -> its cohort's leader
        self.stopping: str | None = None  # "timeout" once --timeout has passed, "stop_when"
        self.stopped_because = ""  # why study.stop_when stopped the study, in words
        # the seed-noise measurement under way: its process, the trial and value it repeats
        self.noise: tuple[Any, int, float] | None = None  # (NoiseProbe, number, value)
        self.noise_done = False
        self.exhausted = False  # the sampler has nothing left to propose (a walked grid)
        self.durations: list[float] = []
        self.on_trial_end: Callable[[Progress], None] | None = None
        self.on_epoch: Callable[[EpochProgress], None] | None = None
        self.started = time.perf_counter()
        self._beat_stop = threading.Event()
        self.retry = Retry("Optuna storage", url, 0.0)  # run_study sets the window
        self.final = Final(spec, data, tracker, url, self.lock_key, self.retry)
        self.me = process_id(os.getpid())
        self.stale = StaleTrials(tracker, self.me)
        self.book = Bookkeeping()
        self.freed_at: list[float] = []  # when each worker left with nothing to train did
        # What waits for a moment when no worker waits for the driver: asking ahead, closing
        # told trials' MLflow runs, their progress lines (see `_loop`).
        self.later: list[Callable[[], None]] = []
        self.later_since = 0.0  # when the oldest of `later` began to wait
        self.window = prune_window(spec)  # the epochs at which the pruner can prune at all
        self.completed = 0  # trials completed in the study, as last seen (ask) and told here

    # ------------------------------------------------------------ the loop

    def run(
        self,
        study: optuna.Study,
        base_seed: int,
        on_start: Callable[[dict[str, Any]], None] | None,
        on_trial_end: Callable[[Progress], None] | None,
        on_epoch: Callable[[EpochProgress], None] | None,
    ) -> StudyResult:
        self.study, self.base_seed = study, base_seed
        self.recent = RecentTrials(study)  # the pruner's and the progress line's reads
        self.final.study, self.final.retry = study, self.retry
        self.on_trial_end, self.on_epoch = on_trial_end, on_epoch
        if on_start is not None:
            best = best_or_none(study, self.objectives)
            on_start(
                {
                    "best_value": primary(best) if best else None,
                    "best_number": best.number if best else None,
                    "name": self.name,
                    "data": self.data.info,
                    "device": str(self.data.train[0].device),
                    "workers": self.executor.description,
                    "fused_trials": self.spec.study.fused_trials,
                    "storage": redact_url(self.url),
                    "tracking_uri": redact_url(self.tracker.uri),
                    "done": count_finished(study),
                    "warm_started": study.user_attrs.get(WARM_STARTED),
                    "total": self.total,
                }
            )
        self.started = time.perf_counter()
        beat = threading.Thread(target=self._beat, name="hpo-heartbeat", daemon=True)
        beat.start()
        interrupted, status, test, note = False, "FAILED", {}, ""
        try:
            self.executor.ready()
            try:
                loop_start = time.perf_counter()
                self._loop()
                self.book.loop = time.perf_counter() - loop_start
            except KeyboardInterrupt:
                interrupted = True
                # Ctrl-C may land inside a storage write: drop that half-done transaction,
                # whose SQLite lock would otherwise block every write that follows.
                storage_of(self.study).remove_session()
                self.executor.close(interrupt=True)
                self._stop_waiting(CLEANUP_RETRY_S)  # whoever presses Ctrl-C wants out
                self._drain_later(ask=False)
                self._interrupt_all("interrupted (Ctrl-C)")
            except ServerLost as e:
                status = "KILLED"
                self.executor.close(interrupt=True)
                # Clean up what can be reached now, without waiting again: a trial whose
                # storage is gone stays RUNNING and is failed by the next process later.
                self._stop_waiting(0.0)
                self._drain_later(ask=False)
                self._interrupt_all(f"interrupted: {e.what} {e.reason}")
                raise
            self.executor.close()
            status = "KILLED"  # until the test evaluation is through: a second Ctrl-C lands here
            test, note = self.final.evaluate()
            status = "KILLED" if interrupted else "FINISHED"
        finally:
            if self.later:  # a failure of another kind: the told trials' runs are closed still
                try:
                    self._drain_later(ask=False)
                except Exception:  # noqa: BLE001 - the failure on its way up says more
                    self.later = []
            self._beat_stop.set()
            if self.noise is not None:
                self.noise[0].close()
            self.executor.close(interrupt=True)
            try:
                self._close_parent(status)
            except ServerLost:
                pass  # the run's own ServerLost is on its way up; a rerun closes the parent
        return self._result(interrupted, test, note)

    def _drain_later(self, ask: bool = True) -> None:
        """Do all of `later` now; without `ask`, on the way out, ask for no trial. A tracking
        server lost meanwhile leaves the rest: its runs are closed by the next process."""
        while self.later:
            then = self.later[0]
            if then != self._fill_slots or ask:
                try:
                    then()
                except ServerLost:
                    if ask:
                        raise
                    self.later = []
                    return
            self.later.pop(0)

    def _stop_waiting(self, window_s: float) -> None:
        """Wait at most `window_s` for a lost server from now on (clean-up on the way out)."""
        for retry in (self.retry, self.tracker.retry):
            if retry is not None:
                retry.window_s = min(retry.window_s, window_s)

    def _loop(self) -> None:
        timeout = self.spec.study.timeout
        deadline = time.monotonic() + timeout if timeout else None
        stale_checked = 0.0
        self._check_stop()  # a study run again after it stopped stops again, saying why
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline and not self.stopping:
                self.stopping = "timeout"
            if now - stale_checked >= HEARTBEAT_S / 2:
                with self.book.step("storage checks"):
                    # Our own heartbeats first: after an outage they may all be old.
                    for r in list(self.running.values()):
                        storage_of(self.study).record_heartbeat(trial_id(r.trial))
                    # A trial its process left as it asked for it (no `driver`) is failed by
                    # what knows why, before the heartbeat check fails it without a reason.
                    # This process asks on this thread only: none of its own is mid-ask.
                    if has_lock(self.url):
                        with storage_lock(self.url, self.lock_key, self.retry):
                            fail_orphans(self.study, self.study.get_trials(deepcopy=False))
                    fail_stale_trials(self.study)  # trials of dead processes: on_stale
                    self.stale.fail_dead_here(self.study)
                stale_checked = now
            if self.stopping or self.exhausted:
                for number in self.executor.cancel():  # never started: they run again later
                    if number in self.running:
                        self._interrupt(number, self.stopping or "no more trials to ask for")
            if self._fill_slots(ahead=False):  # jobs for every worker, at once
                self._ask_ahead_later()  # and the one it holds next, when there is a moment
            if not self.running:
                if self.later:
                    self._drain_later()
                    continue
                if self.stopping or self.exhausted or count_finished(self.study) >= self.total:
                    return
                # The budget is held by other processes' trials: wait, in case one of them
                # dies and its configuration has to run again.
                time.sleep(POLL_S)
                stale_checked = 0.0
                continue
            # A worker's epoch is answered, and a finished trial told, before what can wait:
            # one thing of `later` at a time, when no message is in, or when the oldest has
            # waited `LATER_S` (a driver that answers epochs without a pause gets to it too).
            events = self.executor.wait(0.0 if self.later else POLL_S)
            for event in events:
                if isinstance(event, Started) and event.number in self.running:
                    self._on_started(event.number, event.worker)
                elif isinstance(event, Epoch):
                    self._on_epoch(event)
                elif isinstance(event, Done):
                    # Its worker has started the job it held, if any: closing this trial's
                    # MLflow run and printing its line wait for a moment when no worker waits.
                    busy = self._busy()
                    self._defer(self._told(event.number, event.record))
                    if self._busy() < self.executor.slots <= busy:  # a worker has nothing
                        self.freed_at.append(time.perf_counter())
                    self._ask_ahead_later()
                elif isinstance(event, Lost):
                    self._on_lost(event.number, event.reason)
            if self.later and (not events or time.monotonic() - self.later_since >= LATER_S):
                self.later[0]()  # taken off once done: a Ctrl-C in it leaves it to the clean-up
                self.later.pop(0)
                self.later_since = time.monotonic()
            with self.book.step("epoch logging"):
                self.tracker.flush(due_only=True)  # a fast trial's last second of epochs

    def _fill_slots(self, ahead: bool = True) -> bool:
        """Hand every worker a job to train and, with `ahead`, one to hold next; True when a
        job was handed over.

        The job a worker holds is asked for while it trains: when a trial ends, the next
        starts at once, without waiting for the storage, the sampler or the driver (a digits
        trial trains in a fraction of a second, and its worker stood idle a tenth of it). So
        the sampler proposes each trial without the result of the one before it on its
        worker, as with one more worker; with one worker, which results it has seen is still
        the same in every run of the same spec and seed. A trial's MLflow run is created when
        its worker starts it (`_on_started`): one taken back unstarted when the study stops
        has none."""
        limit = self.executor.slots * (2 if ahead else 1)
        submitted = False
        while not (self.stopping or self.exhausted) and self._busy() < limit:
            jobs = self._reserve()
            if not jobs:
                break
            for job in jobs:
                if self.freed_at and self._busy() < self.executor.slots:
                    self.book.add("worker idle", time.perf_counter() - self.freed_at.pop(0))
                self.executor.submit(job)
                submitted = True
        return submitted

    def _ask_ahead_later(self) -> None:
        """Fill the workers' hands (`_fill_slots`) first thing when there is a moment."""
        if self._fill_slots not in self.later:
            self._defer(self._fill_slots, first=True)

    def _defer(self, then: Callable[[], None], first: bool = False) -> None:
        """Do `then` when there is a moment (see `_loop`): after what waits already, or
        `first`."""
        if not self.later:
            self.later_since = time.monotonic()
        self.later.insert(0 if first else len(self.later), then)

    def _beat(self) -> None:
        storage = storage_of(self.study)
        while not self._beat_stop.wait(HEARTBEAT_S):
            for r in list(self.running.values()):
                try:
                    storage.record_heartbeat(trial_id(r.trial))
                except Exception:  # noqa: BLE001 - the storage is away; the loop will notice
                    pass

    # ------------------------------------------------------------ one trial's life

    def _busy(self) -> int:
        """Jobs handed to the executor, trained or held (every trial running here, a job asked
        for being handed over at once): a cohort is one job."""
        return len({self.cohort_of.get(n, n) for n in self.running})

    def _reserve(self) -> list[TrialJob | CohortJob]:
        """The next trial to run, or with `study.fused_trials: K` a cohort of up to K: a leader
        the sampler proposes freely, then followers enqueued with the leader's structural
        hyperparameters, the sampler picking the rest. Baselines and retries run alone, and so
        does a follower whose shape differs (a trial another process queued came first)."""
        leader = self._ask()
        if leader is None:
            return []
        trial = self.running[leader.number].trial
        on_cpu = self.data.train[0].device.type == "cpu"
        shape = resources.Shape.of(self.data)
        if not leads_a_cohort(self.spec, trial.user_attrs, leader.config, shape, on_cpu):
            return [leader]
        k = self.spec.study.fused_trials
        fixed = {n: v for n, v in trial.params.items() if is_structural(n)}
        members, alone = [leader], []
        for _ in range(k - 1):
            job = self._ask(fixed)
            if job is None:
                break
            same = job.config and structure(job.config) == structure(leader.config)
            (members if same else alone).append(job)
        if len(members) == 1:
            return [leader, *alone]
        numbers = [j.number for j in members]
        for job in members:
            # batch_seed: the batch order it trained on
            attrs = {"fused_with": numbers, "batch_seed": leader.seed}
            set_user_attrs(self.running[job.number].trial, attrs)
            self.cohort_of[job.number] = leader.number
        return [CohortJob(members), *alone]

    def _ask(self, fixed: dict[str, Any] | None = None) -> TrialJob | None:
        """Ask for a trial while the budget has room, counting every process's trials; with
        `fixed`, only when no other trial waits in the queue (it would be asked first)."""
        # A stop (Ctrl-C) waits for the whole ask: a trial asked and not yet in `running`
        # would stay RUNNING, unknown to the clean-up, and one not yet sampled would be queued
        # again without its parameters.
        with self.book.step("ask"), uncut():
            return self._asked(fixed)

    def _asked(self, fixed: dict[str, Any] | None) -> TrialJob | None:
        with storage_lock(self.url, self.lock_key, self.retry):
            trials = self.study.get_trials(deepcopy=False)
            if has_lock(self.url) and fail_orphans(self.study, trials):  # see fail_orphans
                trials = self.study.get_trials(deepcopy=False)
            if budget_used(trials) >= self.total:
                return None
            if fixed is not None:
                if any(t.state == TrialState.WAITING for t in trials):
                    return None
                self.study.enqueue_trial(fixed)
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize"
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()  # an enqueued retry first, if there is one
            storage_of(self.study).record_heartbeat(trial_id(trial))
            # seed: the torch seed; retraining with it repeats the trial (a retry has the seed
            # of the trial it runs again, queued with it)
            seed = trial.user_attrs.get("seed", self.base_seed * 100_003 + trial.number)
            set_user_attrs(trial, {"driver": self.me, "seed": seed})
        self.running[trial.number] = running = _Running(trial, None, None)
        baseline = trial.user_attrs.get("baseline")
        try:
            if baseline is not None:  # fixed: the sampler is not asked, so params stay empty
                running.config = self.spec.baseline_config(baseline, self.data.info["n_train"])
            else:
                running.config = suggest_params(trial, self.spec.space)
        except Exception as e:  # noqa: BLE001 - a sampler's error fails this trial only
            self._open_run(trial.number)  # its run shows why
            self._on_done(trial.number, TrialRecord(trial.number, None, seed, failure=str(e)))
            return None
        trial.set_user_attr("config", running.config.as_dict())
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.completed = len(done)
        peers = [t.user_attrs["metrics"]["val_loss"] for t in done if "metrics" in t.user_attrs]
        return TrialJob(
            trial.number, running.config, seed, peers, trial.user_attrs.get("batch_seed")
        )

    def _on_started(self, number: int, worker: str) -> None:
        """A worker started the trial: its MLflow child run, unless the study is stopping (it
        is interrupted at its first epoch), and where it runs, in one write."""
        if self.stopping:
            set_user_attrs(self.running[number].trial, {"worker": worker})
        else:
            self._open_run(number, worker=worker)

    def _open_run(self, number: int, **attrs: Any) -> None:
        """The trial's MLflow child run; its id goes to the trial's user attributes with
        `attrs`."""
        r = self.running.get(number)
        if r is None or r.run_id is not None:
            return
        retry_of = r.trial.user_attrs.get("retry_of")
        baseline = r.trial.user_attrs.get("baseline")
        tags = {"hpo.retry_of": str(retry_of)} if retry_of is not None else {}
        if baseline is not None:
            tags["hpo.baseline"] = baseline
        with self.book.step("run creation"):
            r.run_id = self.tracker.start_trial(number, tags or None)
            set_user_attrs(r.trial, {**attrs, "mlflow_run_id": r.run_id})

    def _on_epoch(self, e: Epoch) -> None:
        r = self.running.get(e.number)
        if r is None:  # already given up on (its process was failed as stale)
            self.executor.decide(e.number, "interrupted")
            return
        r.history.append(e.metrics)
        self.book.training += e.metrics.get("epoch_seconds", 0.0)
        t0 = time.perf_counter()
        if r.pruned:
            # The worker trained on before the prune reached it: the epoch is logged, and
            # Optuna's record of the trial ends where the pruner stopped it.
            self.executor.decide(e.number, "pruned")
            self._log_epoch(r, e)
            return
        # What Optuna hears of the epoch reaches the run too, whatever the moment of a
        # Ctrl-C: the report and the logging are one uncut block.
        with uncut():
            # The decision is sent as soon as it is known (a worker may wait for it). A baseline
            # is a reference point: it trains to the end, never pruned.
            decision = None
            if self.stopping:
                decision = "interrupted"
                self.executor.decide(e.number, decision)
            elif "baseline" in r.trial.user_attrs or isinstance(self.study.pruner, NopPruner):
                self.executor.decide(e.number, None)  # before its value is stored, not after
                self._report(r, e.metrics[self.metric], e.epoch)
            else:
                self._report(r, e.metrics[self.metric], e.epoch)
                # Pruning at the last epoch would save nothing: the trial is complete.
                last = e.epoch >= self.spec.training.max_epochs
                may = self.window is None or self.window.may_prune(e.epoch, self.completed)
                decision = "pruned" if may and not last and self._should_prune(r) else None
                self.executor.decide(e.number, decision)
                r.pruned = decision == "pruned"
            self.book.add("epoch decision", time.perf_counter() - t0)
            self._log_epoch(r, e)
        if self.on_epoch is not None:
            value = e.metrics.get(self.metric, math.nan)
            max_epochs = self.spec.training.max_epochs
            self.on_epoch(EpochProgress(e.number, e.epoch, max_epochs, value, decision))

    def _report(self, r: _Running, value: float, epoch: int) -> None:
        """An epoch's value of the metric in the trial's Optuna record, for the pruner and
        the dashboard: `Trial.report`. Optuna takes none with several objectives (its
        samplers would misread a pruned trial's); the curve is then the trial's `curve`
        attribute as it finishes, and the pruner reads it (`FirstObjective`)."""
        if not self.objectives.several:
            r.trial.report(value, epoch)

    def _should_prune(self, r: _Running) -> bool:
        """The pruner's answer. A median or percentile one (the pruners with a `window`, which
        only read) is asked about the trial's curve as this driver holds it, against the
        study's trials as last read (`RecentTrials`): `Trial.should_prune` would read both
        from the storage at each epoch, 2 reads of every trial. Other pruners, which keep
        state in the storage, through `Trial.should_prune`. With several objectives, the
        pruner on the first one against trials no larger (`FirstObjective`)."""
        if self.window is None and not self.objectives.several:
            return r.trial.should_prune()
        me = curve_of(as_frozen(r.trial.number, {}, None), [e.get(self.metric) for e in r.history])
        if not self.objectives.several:
            return self.study.pruner.prune(self.recent, me)
        assert r.config is not None
        n_params = resources.of_config(r.config, resources.Shape.of(self.data), True).params
        return self.study.pruner.prune(FirstObjective(self.recent, n_params), me)

    def _log_epoch(self, r: _Running, e: Epoch) -> None:
        if r.run_id is not None:  # None: started as the study stopped
            with self.book.step("epoch logging"):
                self.tracker.log_epoch(r.run_id, e.epoch, e.metrics)

    def _on_done(self, number: int, record: TrialRecord) -> None:
        self._told(number, record)()

    def _told(self, number: int, record: TrialRecord) -> Callable[[], None]:
        """Store a finished trial's result and tell Optuna; what is left (closing its tracker
        run, the progress line) comes back, to be called when there is a moment (`later`)."""
        # A stop (Ctrl-C) waits for the trial to be told: between leaving `running` and the
        # tell, it would stay RUNNING in the storage, unknown to the clean-up.
        with uncut():
            r = self.running[number]
            if r.run_id is None and record.outcome == "COMPLETE" and not r.pruned:
                # Started as the study stopped, it ended before an answer stopped it: its run
                # now (its weights may be the best), with its curve.
                self._open_run(number)
                if r.run_id is not None:
                    for epoch, metrics in enumerate(record.history, 1):
                        self.tracker.log_epoch(r.run_id, epoch, metrics)
            self.running.pop(number)
            self.cohort_of.pop(number, None)
            trial = r.trial
            t0 = time.perf_counter()
            if r.pruned and record.outcome == "COMPLETE":
                # The pruner's answer reached the worker after the trial's last epoch (it
                # does not wait for it): pruned, as the driver answered.
                record.stopped_by, record.weights = "pruned", None
            lost: ServerLost | None = None
            if r.run_id is not None:
                # Its last epochs reach its run before it is told: a process killed before the
                # run is closed (`rest`) loses none of a finished trial's curve. A tracking
                # server gone for good does not keep it from being told: raised after.
                try:
                    with self.book.step("epoch logging"):
                        self.tracker.flush(run_id=r.run_id)
                except ServerLost as e:
                    lost = e
            settled = settle(record, self.objectives, trial.user_attrs.get("fused_with"))
            set_user_attrs(trial, settled.attrs)
            checkpoint_s = 0.0
            if settled.state == TrialState.COMPLETE and r.run_id is not None:
                assert settled.values is not None
                t1 = time.perf_counter()
                try:
                    self._keep_if_best(trial, settled, record, r.run_id)
                except ServerLost:
                    # Its weights could not be kept: it is interrupted with the others on the way
                    # out (told, queued to run again), not left RUNNING.
                    self.running[number] = r
                    raise
                checkpoint_s = time.perf_counter() - t1
                self.book.add("checkpoint", checkpoint_s)
            if self.objectives.constraints and settled.state != TrialState.FAIL:
                # for the samplers that prefer feasible trials (TPE, NSGA-II, GP)
                told = as_frozen(trial.number, settled.attrs, settled.values)
                for key, violation in self.objectives.violations(told).items():
                    trial.set_constraint(key, violation)
            frozen = self._tell(trial, settled.state, settled.values)
            self.completed += frozen is not None and settled.state == TrialState.COMPLETE
            if settled.retry:
                queue_again(self.study, trial, trial.user_attrs.get("kills", 0))
            params = _params(r.config)
            self.book.add("tell", time.perf_counter() - t0 - checkpoint_s)
        if lost is not None:
            raise lost
        if frozen is not None:
            self._check_stop()

        show: Callable[[], None] = lambda: None  # noqa: E731
        if frozen is not None:
            with self.book.step("progress"):
                show = self._progress(frozen, "interrupted: runs again" if settled.retry else "")

        def rest() -> None:
            if r.run_id is not None:
                with self.book.step("run end"):
                    self.tracker.end_trial(
                        r.run_id, settled.run_state, params, settled.final, settled.tags
                    )
            show()

        return rest

    def _check_stop(self) -> None:
        """Stop asking for trials, and stop those training, once `study.stop_when` says so."""
        stop = self.spec.study.stop_when
        if stop is None or self.stopping:
            return
        trials = self.study.get_trials(deepcopy=False)
        noise = self._seed_noise(trials) if stop.plateau is not None else None
        direction = self.objectives.direction.upper()
        reason = stop_reason(trials, direction, self.metric, stop, noise)
        if reason:
            self.stopping, self.stopped_because = "stop_when", reason
            if self.study.user_attrs.get("stopped_because") != reason:
                self.study.set_user_attr("stopped_because", reason)  # for the report

    def _seed_noise(self, trials: list[FrozenTrial]) -> float | None:
        """The seed noise of one training (the deviation of the metric over seeds) a plateau
        is judged against when trials have no members to measure it: measured once, when a
        plateau can first be reached, by training the best configuration with NOISE_SEEDS
        more seeds in a process of its own (`NoiseProbe`) while the study goes on, and kept
        in the study (`seed_noise`). None until then: a plateau is judged on any improvement,
        which stops no sooner than the noise would."""
        if self.spec.training.repeats > 1 or self.spec.dataset.split.folds:
            return None  # each trial's own standard error is the measure
        stored = self.study.user_attrs.get("seed_noise")
        if stored:
            return stored["sd"]
        if self.noise is not None:
            probe, number, value = self.noise
            values = probe.result()
            if values is None:
                return None  # still training
            probe.close()
            self.noise = None
            self.noise_done = True
            if not values:
                return None
            values = [value, *values]
            sd = statistics.stdev(values)
            self.study.set_user_attr("seed_noise", {"trial": number, "values": values, "sd": sd})
            return sd
        stop = self.spec.study.stop_when
        if self.noise_done or stop is None or stop.plateau is None:
            return None
        searched = searched_finished(trials)
        best = self.objectives.best([t for t in searched if t.state == TrialState.COMPLETE])
        if best is None or len(searched) < stop.plateau.trials:
            return None
        seed = best.user_attrs.get("seed", 0)
        seeds = [(seed + k * SEED_STEP) % 2**31 for k in range(1, NOISE_SEEDS + 1)]
        device = str(self.data.train[0].device)
        from hpo.executors.local import NoiseProbe

        probe = NoiseProbe(self.spec, device, best.user_attrs["config"], seeds, self.metric)
        self.noise = (probe, best.number, primary(best))
        return None

    def _on_lost(self, number: int, reason: str) -> None:
        """Its worker died: failed, and run again once (`settle_lost`)."""
        with uncut():  # as in `_told`
            r = self.running.pop(number)
            self.cohort_of.pop(number, None)
            kills = r.trial.user_attrs.get("kills", 0)
            settled = settle_lost(reason, kills)
            set_user_attrs(r.trial, settled.attrs)
            frozen = self._tell(r.trial, settled.state, None)
            if settled.retry:
                queue_again(self.study, r.trial, kills + 1)
        params = _params(r.config)
        if r.run_id is not None:
            self.tracker.end_trial(r.run_id, settled.run_state, params, {}, settled.tags)
        if frozen is not None:
            self._progress(frozen, f"{reason}; " + ("runs again" if settled.retry else "failed"))()

    def _tell(self, trial: optuna.Trial, state: TrialState, values: list[float] | None) -> Any:
        self.recent.forget()  # the next read sees it
        try:
            return self.study.tell(trial, values, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            return None  # another process failed it as stale meanwhile; its result is dropped
        except RuntimeError as e:
            if GRID_STOPPED not in str(e):
                raise
            # The grid sampler calls study.stop() once its grid is walked (the trial is stored
            # by then): ask for no more trials.
            self.exhausted = True
            return storage_of(self.study).get_trial(trial_id(trial))

    def _interrupt_all(self, why: str) -> None:
        for number in list(self.running):
            try:
                self._interrupt(number, why)
            except ServerLost:
                # Its storage is gone: it stays RUNNING there, and the heartbeat check of the
                # next process on the study fails it and runs its configuration again.
                self.running.pop(number, None)

    def _interrupt(self, number: int, why: str) -> None:
        """Stop one of this process's trials where it is: it runs again later."""
        r = self.running[number]
        record = TrialRecord(number, r.config, 0, history=r.history, stopped_by="interrupted")
        record.failure = why
        self._on_done(number, record)

    def _keep_if_best(
        self, trial: optuna.Trial, settled: Settled, record: TrialRecord, run_id: str
    ) -> None:
        """Keep a trial's weights when it could be the study's model (`checkpoint_policy`)."""
        log_all = self.spec.tracking.log_model == "all"
        ensemble = self.spec.tracking.ensemble
        attrs = {**trial.user_attrs, **settled.attrs}
        keep, is_best = checkpoint_policy(
            as_frozen(trial.number, attrs, settled.values),
            self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            self.objectives,
            log_all=log_all,
            baseline="baseline" in trial.user_attrs,
            keep_top=ensemble.candidates if ensemble is not None else 0,
        )
        if keep and record.weights is not None:
            self.tracker.save_checkpoint(run_id, record.weights, record.config.as_dict())
            trial.set_user_attr("checkpoint", True)
            if log_all:
                model = self.final.model(record.config, record.weights)
                example = self.data.raw_example
                self.tracker.log_model(self.final.deployable(model), example, run_id=run_id)
            if is_best:
                self.final.best_weights = (trial.number, record.weights)

    def _progress(self, trial: FrozenTrial, note: str = "") -> Callable[[], None]:
        """The study as `trial` leaves it (trials done, the best, the time left), read now;
        the call returned hands it to `on_trial_end`, which may come a little later."""
        if trial.duration is not None:
            self.durations.append(trial.duration.total_seconds())
        on_trial_end = self.on_trial_end
        if on_trial_end is None:
            return lambda: None
        elapsed = time.perf_counter() - self.started
        slots = self.executor.slots
        progress = progress_of(
            self.study, trial, self.total, self.durations, slots, elapsed, note, self.objectives,
            seen=self.recent,
        )  # fmt: skip
        return lambda: on_trial_end(progress)

    # ------------------------------------------------------------ the end

    def _close_parent(self, status: str) -> None:
        """The parent run ends with the study: left RUNNING while other processes train."""
        try:
            if self.study is not None:
                if self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    return
                if count_finished(self.study) >= self.total and status != "FAILED":
                    status = "FINISHED"
        finally:
            self.tracker.close_parent(status)

    def _result(self, interrupted: bool, test: dict[str, float], note: str) -> StudyResult:
        return result_of(
            self.study,
            study_name=self.name,
            storage=redact_url(self.url),
            tracking_uri=redact_url(self.tracker.uri),
            metric=self.metric,
            test_metrics=test,
            parent_run_id=self.tracker.parent_id,
            device=str(self.data.train[0].device),
            interrupted=interrupted,
            stopped_because=self.stopped_because,
            new_trials=len(self.durations),
            wall_time=time.perf_counter() - self.started,
            data_info=self.data.info,
            test_note=note,
            bookkeeping=self.book.as_dict(),
        )


def _params(config: TrialConfig | None) -> dict[str, Any]:
    """A trial's configuration as its tracker run's params (`widths` lists the widths)."""
    if config is None:
        return {}
    return {k: v for k, v in config.as_dict().items() if k != "width"}


def spec_of(study: optuna.Study) -> Spec:
    """The spec a study was run from, as stored with it."""
    from hpo.config import parse_spec, read_yaml

    text = study.user_attrs.get("spec_yaml")
    if not text:
        raise SpecError([f"study {study.study_name!r} has no stored spec (not run by hpo?)"])
    return parse_spec(read_yaml(text), source_dir=study.user_attrs.get("spec_dir", "."))


def retrain_best(
    study: optuna.Study, seeds: list[int], device: str | None = None
) -> list[dict[str, float]]:
    """Retrain a study's best configuration once per seed: validation and test metrics of each.

    For judging seed noise after the search (`hpo compare --reseed`); the study is not changed.
    """
    spec = spec_of(study)
    if spec.dataset.split.folds:
        raise SpecError(
            [f"--reseed: study {study.study_name!r} uses dataset.split.folds: its trials' "
             "members already measure the noise (compare without --reseed)"]
        )  # fmt: skip
    dev = resolve_device(device or spec.training.device)
    data = load_data(spec, dev)
    test = data.take_test()
    best = best_or_none(study)
    if best is None:
        raise SpecError([f"study {study.study_name!r} has no complete trial to retrain"])
    flush_denormals()  # before this process's first training starts the intra-op threads
    config = TrialConfig.of(best.user_attrs["config"])
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(config, data, dev)
        cfg = train_config(spec, data, config, seed)
        result = train(model, data.train, data.val, cfg)
        if result.failure:
            rows.append({"seed": seed, "failure": result.failure})
            continue
        val = {k: v for k, v in result.best.items() if k.startswith("val_")}
        tested = {f"test_{k}": v for k, v in evaluate(model, test, cfg).items()}
        rows.append({"seed": seed, **val, **tested, "epochs": len(result.history)})
    return rows


def list_studies(storage: str | optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One row per study in a storage: trials by state, best value, test metric."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        row: dict[str, Any] = state_counts(trials)
        best = best_or_none(study)
        test = study.user_attrs.get("test_metrics") or {}
        row.update(
            name=summary.study_name,
            metric=study.user_attrs.get("metric", "?"),
            best=primary(best) if best else None,
            test=", ".join(f"{k}={v:.4f}" for k, v in test.items()),
        )
        rows.append(row)
    return rows
