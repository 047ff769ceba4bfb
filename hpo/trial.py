"""One trial: a configuration, the data and the training settings in, one `TrialRecord` out.

Knows neither Optuna nor MLflow. Whoever runs trials (the driver in `study.py`, through an
executor) hands in a `TrialJob` and callbacks, and gets back a record that says what happened:
the history, the epoch whose weights were kept, why training stopped, the fit label, and on
failure the reason. Nothing here raises for a pruned, stopped, diverged or failed trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpo import resources
from hpo.config import Spec
from hpo.data import Data
from hpo.diagnose import chance_loss, diagnose_fit
from hpo.model import build_mlp, count_parameters
from hpo.params import TrialConfig
from hpo.train import Flag, TrainConfig, TrainResult, fit

# What a finished trial is, from its stop reason: complete, pruned, failed or interrupted.
OUTCOMES = {
    "max_epochs": "COMPLETE",
    "early_stopping": "COMPLETE",
    "pruned": "PRUNED",
    "diverged": "FAIL",
    "failed": "FAIL",
    "interrupted": "INTERRUPTED",
}


@dataclass
class TrialJob:
    """What a trial needs besides the data: its number, configuration and seed."""

    number: int
    config: TrialConfig
    seed: int
    peer_val_losses: list[float] = field(default_factory=list)  # for the fit diagnosis
    # the batch order's seed when not `seed`: a retry of a member of a fused cohort repeats
    # the cohort's batch order
    shuffle_seed: int | None = None

    @property
    def numbers(self) -> list[int]:
        return [self.number]

    @property
    def members(self) -> list[TrialJob]:
        """The trials trained together: a trial alone is a cohort of one."""
        return [self]


@dataclass
class CohortJob:
    """Trials of one shape trained together as one stack (`hpo.steppers.StackStepper`): the
    first one's seed orders the batches they share; each keeps its own seed for its
    initialisation and dropout."""

    jobs: list[TrialJob]

    @property
    def numbers(self) -> list[int]:
        return [j.number for j in self.jobs]

    @property
    def members(self) -> list[TrialJob]:
        return self.jobs


@dataclass
class TrialRecord:
    """Everything a trial produced, as plain data."""

    number: int
    config: TrialConfig | None  # None: the sampler failed before there was one
    seed: int
    n_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    kept_epoch: int | None = None  # the epoch whose weights the model holds at the end
    stopped_by: str = "failed"  # max_epochs | early_stopping | pruned | diverged | interrupted
    fit: str | None = None  # one of diagnose.FIT_LABELS
    fit_evidence: str | None = None
    failure: str | None = None  # why it failed
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # kept, on CPU

    @property
    def outcome(self) -> str:
        """COMPLETE, PRUNED, FAIL or INTERRUPTED."""
        return OUTCOMES[self.stopped_by]

    @property
    def kept(self) -> dict[str, float]:
        """Metrics of the kept epoch (empty when there is none)."""
        return self.history[self.kept_epoch - 1] if self.kept_epoch else {}

    def value(self, metric: str) -> float | None:
        """The study's metric at the kept epoch, when finite."""
        v = self.kept.get(metric)
        return v if v is not None and math.isfinite(v) else None


def build_model(config: TrialConfig, data: Data, device: torch.device | str) -> torch.nn.Module:
    """The MLP a configuration describes, for this data, on `device`."""
    return build_mlp(
        data.n_features,
        data.n_outputs,
        config.widths,
        config.activation,
        config.dropout,
        config.batchnorm,
        config.init,
    ).to(device)


def train_config(spec: Spec, data: Data, config: TrialConfig, seed: int) -> TrainConfig:
    """The training settings of one trial: the spec's, with the configuration's own."""
    es = spec.training.early_stopping
    return TrainConfig.of(
        config,
        task=data.task,
        max_epochs=spec.training.max_epochs,
        monitor=es.monitor,
        patience=es.patience,
        min_delta=es.min_delta,
        restore_best=es.restore_best,
        seed=seed,
        y_scale=data.y_scale,
        precision=spec.training.precision,
    )


def _out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, a MemoryError, or the CPU allocator's refusal."""
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _out_of_memory_reason(error: str, fp: resources.Footprint, device: torch.device) -> str:
    """Why the trial failed, with what it needed and what the device has once it is freed."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free, what = resources.free_memory(device)
    first = error.strip().splitlines()[0][:200]
    return (
        f"out of memory ({first}); this configuration needs about "
        f"{resources.human(fp.total)} ({fp.describe()}); {device} has "
        f"{resources.human(free)} {what}; set training.memory_limit to skip such "
        "configurations"
    )


def run(
    jobs: list[TrialJob],
    spec: Spec,
    data: Data,
    on_epoch_end: Callable[[dict[int, dict[str, float]], int], dict[int, str | None]],
    on_done: Callable[[TrialRecord], None],
    interrupt: Flag | None = None,
) -> None:
    """Build, train and diagnose one configuration, or several of one shape as one stacked
    model (a cohort: `hpo.train.fit`); `on_done` gets each trial's record as soon as it
    stops, its kept weights on the CPU when it completed. `on_epoch_end({number: metrics},
    epoch)` answers each trial still training with None or a stop reason ("pruned",
    "interrupted"). Never raises for the trials' own failures."""
    records = [TrialRecord(j.number, j.config, j.seed) for j in jobs]
    device = data.train[0].device
    fp = resources.of_config(jobs[0].config, resources.Shape.of(data), device.type != "cuda")
    too_large = resources.too_large(fp, spec)
    if too_large:
        for r in records:
            r.failure, r.n_params = too_large, fp.params
            on_done(r)
        return
    done: set[int] = set()
    models: list[torch.nn.Module] = []
    failure, out_of_memory = None, False
    try:
        for job, record in zip(jobs, records, strict=True):
            torch.manual_seed(job.seed)
            models.append(build_model(job.config, data, device))
            record.n_params = count_parameters(models[-1])
        cfgs = [train_config(spec, data, j.config, j.seed) for j in jobs]
        # One batch order for a cohort: its first trial's (or the one a retry repeats).
        shuffle = jobs[0].seed if jobs[0].shuffle_seed is None else jobs[0].shuffle_seed
        for cfg in cfgs:
            cfg.shuffle_seed = shuffle

        def member_done(i: int, result: TrainResult) -> None:
            done.add(i)
            record = _recorded(records[i], result, models[i], data, jobs[i])
            try:
                on_done(record)
            except Exception as e:  # the caller's own failure (its channel closed, say)
                raise _NotHandedBack(e) from e

        def member_epochs(metrics: dict[int, dict[str, float]], epoch: int) -> dict:
            answers = on_epoch_end({jobs[i].number: m for i, m in metrics.items()}, epoch)
            return {i: answers.get(jobs[i].number) for i in metrics}

        fit(models, cfgs, data.train, data.val, member_epochs, member_done, interrupt)
    except _NotHandedBack as e:  # not the trials' failure: the caller's, raised again
        raise e.__cause__ from None  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - fails the trials still training, not the study
        failure = f"{type(e).__name__}: {e}"
        out_of_memory = _out_of_memory(e)
    if failure is None:
        return
    models = []  # out of the except block: what the trials allocated can go
    if out_of_memory:
        failure = _out_of_memory_reason(failure, fp, device)
    for i, record in enumerate(records):
        if i not in done:
            if out_of_memory and len(jobs) > 1:
                # K at once did not fit where one may: each runs again, alone
                record.stopped_by, record.history = "interrupted", []
            else:
                record.failure = failure
            on_done(record)


class _NotHandedBack(Exception):
    """`on_done` raised: the error is the caller's, not the trial's."""


def _recorded(
    record: TrialRecord, result: TrainResult, model: torch.nn.Module, data: Data, job: TrialJob
) -> TrialRecord:
    """The record of a trained model: its curve, why it stopped, kept weights, fit label."""
    record.history = result.history
    record.stopped_by = result.stopped_by
    record.failure = result.failure
    if record.outcome == "COMPLETE":
        record.kept_epoch = result.best_epoch
        record.weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if record.outcome in ("COMPLETE", "PRUNED"):
        chance = chance_loss(data.task, data.n_outputs, data.info.get("class_counts"))
        fit_ = diagnose_fit(
            record.history,
            record.kept_epoch,
            chance,
            job.peer_val_losses,
            record.stopped_by,
            lr=job.config.lr,
        )
        record.fit, record.fit_evidence = fit_.label, fit_.evidence
    return record
