"""Workers per GPU and the cohort size, chosen from a probe of the epoch time when the user
gives neither (`hpo run` on a GPU without --workers, --workers-per-gpu or study.fused_trials).

On a GPU a small net's step is a few dozen tiny kernels: the device waits on the host's
launches, so K trials fused into one stack train at almost the cost of one, and a second worker
process fills the gaps one leaves (building its nets, evaluating, handing over a finished
trial). A wide net already fills the device: fusing it gains nothing. What is cheap to
measure decides: `probe` trains a typical configuration of the search space for two epochs
as a cohort of 1, 2, 4, ... on the training device, and `choose`, a function of those
timings, picks the plan by the rules in `RULES`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hpo.config import Spec

# The cohort sizes probed, smallest first; the probe stops at the first that gains less than
# `SATURATED` over the one before (the device is full: larger ones gain no more).
LADDER = (1, 2, 4, 8, 16)
SATURATED = 1.05
# A probe's epochs take at most this many steps (an epoch of the full split is timed as this
# many steps' share of it).
PROBE_STEPS = 200
RULES = {
    # the smallest cohort within this share of the best throughput probed: members of a cohort
    # share their structure, so a larger one costs the search freedom it does not buy back
    "fuse_within": 0.9,
    # structures the sampler proposes freely: at most (searched trials / this) fused a cohort
    "min_cohorts": 8,
    # one worker is enough when it keeps the device this busy; below, enough workers that
    # their epochs fill each other's gaps
    "busy_enough": 0.9,
    # worker processes on one device at most (each holds its own copy of the data)
    "max_workers_per_device": 4,
    # a trial trains this share of max_epochs on average (early stopping and pruning)
    "epochs_share": 0.5,
    # the driver's hand-over of one finished trial the worker waits on, seconds (its result
    # and kept weights sent, the next job begun)
    "hand_over_s": 0.02,
}


@dataclass(frozen=True)
class Probe:
    """Epoch times of one configuration trained as stacks of K nets on the training device."""

    net: str  # "64-128-10 at batch 64"
    epoch_s: dict[int, float]  # K -> seconds of an epoch of the whole split (graphs captured)
    setup_s: dict[int, float]  # K -> seconds of a job outside its epochs: build, capture

    def epoch(self, n: int) -> float:
        """Seconds of an epoch of `n` nets stacked: probed, else interpolated between the
        sizes probed, or past the largest (the device was full) growing with n."""
        if n in self.epoch_s:
            return self.epoch_s[n]
        ks = sorted(self.epoch_s)
        if n > ks[-1]:
            return self.epoch_s[ks[-1]] * n / ks[-1]
        hi = min(k for k in ks if k > n)
        lo = max(k for k in ks if k < n)
        return self.epoch_s[lo] + (self.epoch_s[hi] - self.epoch_s[lo]) * (n - lo) / (hi - lo)

    def setup(self, n: int) -> float:
        """Seconds outside the epochs of a job of `n` nets (the next size probed, or the
        largest)."""
        return self.setup_s[min([k for k in self.setup_s if k >= n] or [max(self.setup_s)])]


@dataclass(frozen=True)
class Plan:
    """What `choose` picked, and the one line that says why."""

    workers_per_device: int
    fused_trials: int
    why: str


def choose(
    probe: Probe,
    *,
    searched: int,
    max_epochs: int,
    cores: int,
    devices: int,
    members: int = 1,
    kind: str = "GPU",
    fits: Callable[[int, int], bool] = lambda workers, fused: True,
) -> Plan:
    """The plan for `devices` devices of the probed `kind`, `searched` trials the sampler
    proposes, `cores` CPU cores, trials of `members` nets each (folds x repeats, one stack:
    K trials fused are K x members nets); `fits(workers per device, fused trials)` says
    whether that many fit the device's memory."""
    ks = sorted(probe.epoch_s)
    best = max(k / probe.epoch_s[k] for k in ks)
    nets = next(k for k in ks if k / probe.epoch_s[k] >= RULES["fuse_within"] * best)
    k = min(max(1, nets // members), max(1, searched // RULES["min_cohorts"]))
    while k > 1 and not fits(1, k):
        k -= 1
    # With one worker the device waits while it is outside its epochs; enough workers to fill
    # those gaps, within the cores (one for the driver) and the memory.
    epochs = max(1.0, RULES["epochs_share"] * max_epochs)
    train_s = epochs * probe.epoch(k * members)
    outside_s = probe.setup(k * members) + k * RULES["hand_over_s"]
    busy = train_s / (train_s + outside_s)
    w = min(
        math.ceil(RULES["busy_enough"] / busy),
        RULES["max_workers_per_device"],
        max(1, (cores - 1) // devices),
    )
    while w > 1 and not fits(w, k):
        w -= 1
    trial = f"a trial's epoch {probe.epoch(members):.3g} s"
    if members > 1:
        trial += f" ({members} nets)"
    fused = f", {probe.epoch(k * members):.3g} s for {k} fused" if k > 1 else ""
    why = (
        f"chosen from a probe of {probe.net}: {trial}{fused}; one worker would keep the "
        f"{kind} {busy:.0%} busy; --workers or --fused-trials to choose"
    )
    return Plan(w, k, why)


class _Middle:
    """Answers a search space's `suggest_*` calls with the middle of each range (geometric on
    a log scale) and the middle choice: `suggest_params` then builds a typical net."""

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return choices[len(choices) // 2]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False):
        return low + step * round((self._mid(low, high, log) - low) / step)

    def suggest_float(self, name: str, low: float, high: float, step=None, log=False) -> float:
        mid = self._mid(low, high, log)
        return low + step * round((mid - low) / step) if step else mid

    @staticmethod
    def _mid(low: float, high: float, log: bool) -> float:
        return math.sqrt(low * high) if log else (low + high) / 2


def typical_config(spec: Spec) -> Any:
    """The search space's middle configuration (`_Middle`): what the probe trains."""
    from hpo.space import suggest_params

    return suggest_params(_Middle(), spec.space)  # type: ignore[arg-type]


def probe(spec: Spec, data: Any, ladder: tuple[int, ...] = LADDER) -> Probe:
    """Train `typical_config` for two epochs as cohorts of each K in `ladder` (stopping once
    the device is saturated) on the data's device, with the spec's precision. Run it in a
    process of its own (`hpo.executors.local.probe_apart`)."""
    from hpo.train import fit
    from hpo.trial import build_model, train_config

    config = typical_config(spec)
    X, y = data.train
    batch = min(config.batch_size, len(X))
    full_steps = math.ceil(len(X) / batch)
    steps = min(full_steps, PROBE_STEPS)
    rows = (X[: steps * batch], y[: steps * batch])
    device = X.device
    widths = "-".join(str(w) for w in (data.n_features, *config.widths, data.n_outputs))
    # one-off costs (the first kernels loaded, the math libraries' handles) before the timings
    warm_up = replace(train_config(spec, data, config, seed=0), max_epochs=1)
    few = min(steps, 5) * batch
    fit([build_model(config, data, device)], [warm_up], (X[:few], y[:few]), data.val)
    epoch_s: dict[int, float] = {}
    setup_s: dict[int, float] = {}
    for k in ladder:
        t0 = time.perf_counter()
        models = [build_model(config, data, device) for _ in range(k)]
        cfgs = [
            replace(train_config(spec, data, config, seed=i), max_epochs=2, patience=2)
            for i in range(k)
        ]
        built = time.perf_counter() - t0
        history = fit(models, cfgs, rows, data.val)[0].history
        # The second epoch replays the graphs the first captured (with a schedule, whose rate
        # is baked into them, it captures again, as every trial's epoch does); one that
        # diverged at once has only one. Its validation pass is scaled with its steps: an
        # overestimate when a probe's epoch is cut to PROBE_STEPS, small beside the steps.
        first, second = history[0]["epoch_seconds"], history[-1]["epoch_seconds"]
        epoch_s[k] = second * full_steps / steps
        setup_s[k] = built + max(0.0, first - second)
        del models
        if len(epoch_s) > 1 and k / epoch_s[k] < SATURATED * max(
            c / epoch_s[c] for c in epoch_s if c < k
        ):
            break
    return Probe(f"{widths} at batch {batch}", epoch_s, setup_s)
