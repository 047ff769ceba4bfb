"""Every private torch and Optuna API hpo calls, in one place, each with why it is worth it.

`tests/test_private.py` checks each against the installed versions, so an upgrade that removes
or renames one fails there, loudly, and not in a user's study, and that no other module of hpo
reaches into either library's privates; pyproject bounds torch and Optuna above the versions
that test has passed on.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported where used: training imports this module, and not Optuna
    import optuna

# Set on an optimizer to silence the warning torch gives once when a `capturable` optimizer
# steps outside a CUDA graph. hpo's warm-up steps and each epoch's shorter last batch do so by
# design (see `hpo.train.StepGraph`); read in `torch.optim.Optimizer`'s capture health check.
CAPTURABLE_WARNED = "_warned_capturable_if_run_uncaptured"

# The allocator calls that end a capture's use of its memory pool, which a failed
# `capture_end` leaves open (then `empty_cache` and its out-of-memory retry do nothing).
POOL_RELEASES = ("_cuda_endAllocateToPool", "_cuda_releasePool")


def quiet_uncaptured_steps(opt: torch.optim.Optimizer) -> None:
    """No warning when `opt` (capturable) steps outside a CUDA graph."""
    setattr(opt, CAPTURABLE_WARNED, True)


def end_capture_pool(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """After a failed capture, tell the allocator the capture is over."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with contextlib.suppress(Exception):
        pool = graph.pool()
        for release in POOL_RELEASES:
            with contextlib.suppress(Exception):
                getattr(torch._C, release)(index, pool)


# ---------------------------------------------------------------- Optuna


def heartbeat_base() -> type:
    """Optuna's heartbeat interface, which a storage wrapping the RDB storage must also offer
    (`optuna.storages.fail_stale_trials` checks for it); Optuna's public API exports none."""
    from optuna.storages._heartbeat import BaseHeartbeat

    return BaseHeartbeat


# The text of the RuntimeError `study.tell` raises when the grid sampler stopped the study
# (its grid walked) after the trial was stored.
GRID_STOPPED = "Study.stop"


# Where Optuna keeps the parameters a trial was queued with (`Study.enqueue_trial`) until the
# trial suggests them, as its own `Study._pop_waiting_trial_id` reads them.
FIXED_PARAMS = "fixed_params"


def queued_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The parameters of a trial taken from the queue, suggested or not yet."""
    return {**trial.system_attrs.get(FIXED_PARAMS, {}), **trial.params}


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes: heartbeats, attributes of trials by id."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's id in its storage (its number counts within the study)."""
    return trial._trial_id


def cached_storage(rdb: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """The RDB storage behind Optuna's own cache of finished trials, as `optuna.create_study`
    wraps it when handed a URL."""
    import optuna

    return optuna.storages._CachedStorage(rdb)


def write_user_attrs(rdb: optuna.storages.RDBStorage, trial_id: int, attrs: dict) -> bool:
    """Several user attributes of a running trial in one transaction, with Optuna's own
    per-attribute write without its commit (on SQLite 9 attributes take 6 ms, not 16);
    False when this Optuna lacks the calls (then write them one at a time)."""
    try:
        from optuna.storages._rdb.models import TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session

        write = rdb._set_trial_attr_without_commit
    except (ImportError, AttributeError):
        return False
    with _create_scoped_session(rdb.scoped_session, True) as session:
        for key, value in attrs.items():
            write(session, TrialUserAttributeModel, trial_id, key, value)
    return True


def cached_user_attrs(trial: optuna.Trial) -> dict | None:
    """The user attributes a running `optuna.Trial` reads back (`trial.user_attrs`), to
    update after writing them to its storage directly; None where it keeps none."""
    cached = getattr(trial, "_cached_frozen_trial", None)
    return None if cached is None else cached.user_attrs


class TrialsSeenBy:
    """A study as a sampler or a pruner sees it, its trials filtered by `keep(trial)` (and,
    with `show`, each seen as `show(trial)`). Samplers read a study's trials through its
    private `_get_trials` (Optuna 4 and 5), so that is what this filters, besides the public
    `get_trials` and `trials`."""

    def __init__(self, study: optuna.Study, keep: Any, show: Any = None):
        self._study, self._keep, self._show = study, keep, show

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, **kw: Any) -> list:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, **kw)
        kept = [t for t in trials if self._keep(t)]
        return kept if self._show is None else [self._show(t) for t in kept]

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list:
        return self.get_trials()


class RecentTrials(TrialsSeenBy):
    """A study whose trials are read from its storage at most once every `fresh_s` seconds,
    or at the first read after `forget()`: what a median or percentile pruner reads at each
    epoch it may prune (the same finished trials, most of the time) and the progress line.
    The driver forgets after each trial it tells; another process's are seen within
    `fresh_s`."""

    def __init__(self, study: optuna.Study, fresh_s: float = 1.0):
        super().__init__(study, lambda t: True)
        self.fresh_s, self._read_at, self._trials = fresh_s, -math.inf, []

    def forget(self) -> None:
        self._read_at = -math.inf

    def _get_trials(self, deepcopy: bool = True, states: Any = None, **kw: Any) -> list:
        now = time.monotonic()
        if now - self._read_at >= self.fresh_s:
            self._trials = self._study._get_trials(deepcopy=False, states=None, **kw)
            self._read_at = now
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)
