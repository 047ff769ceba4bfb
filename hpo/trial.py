"""One trial: a configuration, the data and the training settings in, one `TrialRecord` out.

Knows neither Optuna nor MLflow. Whoever runs trials (the driver in `study.py`, through an
executor) hands in a `TrialJob` and callbacks, and gets back a record that says what happened:
the history, the epoch whose weights were kept, why training stopped, the fit label, and on
failure the reason. Nothing here raises for a pruned, stopped, diverged or failed trial.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpo import resources
from hpo.config import Spec
from hpo.data import Data
from hpo.diagnose import chance_loss, diagnose_fit
from hpo.model import build_mlp, count_parameters
from hpo.params import TrialConfig
from hpo.train import Flag, TrainConfig, TrainResult, fit, lower_is_better

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
    def trials(self) -> list[TrialJob]:
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
    def trials(self) -> list[TrialJob]:
        return self.jobs


# A trial's repeat r trains with seed `seed + r * SEED_STEP` (repeat 0 with the trial's own).
SEED_STEP = 100_003


@dataclass
class Member:
    """One training of a trial's configuration: its seed and, with folds, its fold."""

    seed: int
    fold: int | None = None

    def describe(self) -> str:
        return f"seed {self.seed}" if self.fold is None else f"fold {self.fold}, seed {self.seed}"


def members_of(seed: int, repeats: int, folds: int | None) -> list[Member]:
    """The trainings a trial's value is the mean of: each repeat's seed on each fold."""
    seeds = [(seed + r * SEED_STEP) % 2**31 for r in range(repeats)]
    if folds is None:
        return [Member(s) for s in seeds]
    return [Member(s, k) for s in seeds for k in range(folds)]


@dataclass
class MemberRecord:
    """One member's own training: its curve, kept epoch and why it stopped."""

    seed: int
    fold: int | None
    history: list[dict[str, float]]
    kept_epoch: int | None
    stopped_by: str

    @property
    def kept(self) -> dict[str, float]:
        return self.history[self.kept_epoch - 1] if self.kept_epoch else {}


@dataclass
class TrialRecord:
    """Everything a trial produced, as plain data. A trial of several members (repeats,
    folds) holds their mean curve in `history`, their mean kept metrics in `kept`, and each
    member's own in `members`."""

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
    members: list[MemberRecord] = field(default_factory=list)  # empty: a trial of one
    inference_ms: float | None = None  # measured when the study asks for it (`measure_inference`)

    @property
    def outcome(self) -> str:
        """COMPLETE, PRUNED, FAIL or INTERRUPTED."""
        return OUTCOMES[self.stopped_by]

    @property
    def kept(self) -> dict[str, float]:
        """Metrics of the kept epoch (empty when there is none); with members, the mean of
        each member's kept metrics."""
        if self.members:
            kept = [m.kept for m in self.members if m.kept]
            if len(kept) < len(self.members):
                return {}
            return {k: statistics.fmean([m[k] for m in kept]) for k in kept[0]}
        return self.history[self.kept_epoch - 1] if self.kept_epoch else {}

    def value(self, metric: str) -> float | None:
        """The study's metric at the kept epoch (the members' mean), when finite."""
        v = self.kept.get(metric)
        return v if v is not None and math.isfinite(v) else None

    def costs(self, names: list[str]) -> dict[str, float]:
        """The costs named (`hpo.config.COSTS`) that this record has."""
        have = {
            "n_params": float(self.n_params) if self.n_params else None,
            "train_seconds": sum(e.get("epoch_seconds", 0.0) for e in self.history)
            if self.history else None,
            "inference_ms": self.inference_ms,
        }  # fmt: skip
        return {n: v for n in names if (v := have.get(n)) is not None}

    def member_values(self, metric: str) -> list[float]:
        """Each member's metric at its kept epoch."""
        return [m.kept.get(metric, math.nan) for m in self.members]

    def standard_error(self, metric: str) -> float | None:
        """The standard error of the members' mean: their sample deviation over sqrt(n);
        None for a trial of one."""
        values = self.member_values(metric)
        if len(values) < 2 or not all(math.isfinite(v) for v in values):
            return None
        return statistics.stdev(values) / math.sqrt(len(values))


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
    "interrupted"). Never raises for the trials' own failures.

    With `training.repeats` or `dataset.split.folds` each trial is several members (each
    repeat's seed on each fold), trained in the same stack, each on its own rows in its own
    order with its own early stopping; the trial is heard of as one: each epoch the mean of
    its members' metrics (a member that stopped counts with its kept epoch's), each member's
    own as `member_<i>/<metric>`, and one record once all its members stopped."""
    folds = spec.dataset.split.folds
    plans = [_Plan(job, members_of(job.seed, spec.training.repeats, folds)) for job in jobs]
    flat = [(p, i) for p in plans for i in range(len(p.members))]  # the stack's members
    own_rows = len(flat) > len(plans) or folds is not None
    device = data.train[0].device
    fp = resources.of_config(jobs[0].config, resources.Shape.of(data), device.type != "cuda")
    too_large = resources.too_large(fp, spec, copies=len(plans[0].members))
    if too_large:
        for p in plans:
            p.record.failure, p.record.n_params = too_large, fp.params
            on_done(p.record)
        return
    models: list[torch.nn.Module] = []
    failure, out_of_memory = None, False
    try:
        for p, i in flat:
            torch.manual_seed(p.members[i].seed)
            models.append(build_model(p.job.config, data, device))
            p.record.n_params = count_parameters(models[-1])
        cfgs = [train_config(spec, data, p.job.config, p.members[i].seed) for p, i in flat]
        rows = None
        if own_rows:  # each member its own rows and order: its fold's, or all of them
            all_rows = (torch.arange(len(data.train[0]), device=device),
                        torch.arange(len(data.val[0]), device=device))  # fmt: skip
            rows = [all_rows if folds is None else data.folds[p.members[i].fold] for p, i in flat]
        else:  # one batch order for a cohort: its first trial's (or the one a retry repeats)
            shuffle = jobs[0].seed if jobs[0].shuffle_seed is None else jobs[0].shuffle_seed
            for cfg in cfgs:
                cfg.shuffle_seed = shuffle
        # every member's weights: a fold ensemble's, or an ensemble's out-of-fold picks
        timed = "inference_ms" in spec.study.named_costs()
        every = folds is not None and (
            spec.dataset.split.final_model == "fold_ensemble" or spec.tracking.ensemble is not None
        )

        def member_done(k: int, result: TrainResult) -> None:
            p, i = flat[k]
            p.results[i] = result
            p.models[i] = models[k]
            if p.sent or not (p.complete or result.failure):
                return
            p.sent = True
            record = _recorded(p, data, spec.study.metric, every, timed)
            try:
                on_done(record)
            except Exception as e:  # the caller's own failure (its channel closed, say)
                raise _NotHandedBack(e) from e

        def member_epochs(metrics: dict[int, dict[str, float]], epoch: int) -> dict:
            heard: dict[int, dict[str, float]] = {}
            for p in plans:
                mine = {i: metrics[k] for k, (q, i) in enumerate(flat) if q is p and k in metrics}
                if not mine or p.sent:
                    continue
                if any(i not in mine and i not in p.results for i in range(len(p.members))):
                    # a member diverged this epoch: as it finishes it fails the trial
                    p.failing = True
                if not p.failing:
                    heard[p.job.number] = p.epoch(mine)
            answers = on_epoch_end(heard, epoch) if heard else {}
            # the members of a trial that failed (a member diverged) stop with it
            return {
                k: "interrupted"
                if flat[k][0].sent or flat[k][0].failing
                else answers.get(flat[k][0].job.number)
                for k in metrics
            }

        fit(models, cfgs, data.train, data.train if folds else data.val, member_epochs,
            member_done, interrupt, own_rows=rows)  # fmt: skip
    except _NotHandedBack as e:  # not the trials' failure: the caller's, raised again
        raise e.__cause__ from None  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - fails the trials still training, not the study
        failure = f"{type(e).__name__}: {e}"
        out_of_memory = _out_of_memory(e)
    if failure is None:
        return
    models = []  # out of the except block: what the trials allocated can go
    for p in plans:
        p.models = {}
    if out_of_memory:
        failure = _out_of_memory_reason(failure, fp, device)
    for p in plans:
        if not p.sent:
            if out_of_memory and len(jobs) > 1:
                # K at once did not fit where one may: each runs again, alone
                p.record.stopped_by, p.record.history = "interrupted", []
            else:
                p.record.failure = failure
            on_done(p.record)


class _Plan:
    """A trial in a stack: its members, their results as they stop, its mean curve."""

    def __init__(self, job: TrialJob, members: list[Member]):
        self.job, self.members = job, members
        self.record = TrialRecord(job.number, job.config, job.seed)
        self.results: dict[int, TrainResult] = {}
        self.models: dict[int, torch.nn.Module] = {}
        self.sent = False  # its record handed back
        self.failing = False  # a member diverged: the others stop, unheard

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.members)

    def epoch(self, metrics: dict[int, dict[str, float]]) -> dict[str, float]:
        """The epoch as the driver hears it: the members' mean (one that stopped counts with
        its kept epoch's metrics), and each member's own when there are several."""
        if len(self.members) == 1:
            return metrics[0]
        keys = next(iter(metrics.values()))
        each = [metrics.get(i) or self.results[i].best for i in range(len(self.members))]
        mean = {k: statistics.fmean([m.get(k, math.nan) for m in each]) for k in keys}
        self.record.history.append(mean)
        heard = dict(mean)
        for i, m in metrics.items():
            own = {f"member_{i}/{k}": v for k, v in m.items() if k.startswith(("train", "val"))}
            heard |= own
        return heard


def measure_inference(
    model: torch.nn.Module, X: torch.Tensor, rows: int = 1000, warmup: int = 3, timed: int = 10
) -> float:
    """Milliseconds to predict a batch of `rows` rows of `X` on its device, without gradients:
    the median of `timed` batches after `warmup` (the study cost `inference_ms`)."""
    batch = X[:rows] if len(X) >= rows else X.repeat(math.ceil(rows / len(X)), 1)[:rows]
    cuda = batch.device.type == "cuda"
    was = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + timed):
            if cuda:
                torch.cuda.synchronize(batch.device)
            t0 = time.perf_counter()
            model(batch)
            if cuda:
                torch.cuda.synchronize(batch.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    model.train(was)
    return statistics.median(times) * 1000


class _NotHandedBack(Exception):
    """`on_done` raised: the error is the caller's, not the trial's."""


def _recorded(
    p: _Plan, data: Data, metric: str, every: bool = False, timed: bool = False
) -> TrialRecord:
    """The record of a trained trial: its curve, why it stopped, kept weights, fit label. A
    trial of several members: its members' records, the mean curve (`_Plan.epoch`), the
    median kept epoch, and the weights of its best member (by the study's metric), or with
    `every` each member's, their names prefixed `member<i>.` (a fold ensemble). `timed`: its
    kept network's inference time is measured (`measure_inference`)."""
    record = p.record
    results = [p.results.get(i) for i in range(len(p.members))]
    if len(p.members) == 1:
        result = results[0]
        assert result is not None
        record.history, record.stopped_by, record.failure = (
            result.history, result.stopped_by, result.failure
        )  # fmt: skip
        kept = result.best_epoch
        best = 0
    else:
        record.members = [
            MemberRecord(m.seed, m.fold, r.history, r.best_epoch or None, r.stopped_by)
            for m, r in zip(p.members, results, strict=True)
            if r is not None
        ]
        failed = [(m, r) for m, r in zip(p.members, results, strict=True) if r and r.failure]
        reasons = {r.stopped_by for r in results if r is not None}
        if failed:
            member, result = failed[0]
            record.stopped_by = result.stopped_by
            record.failure = f"member {member.describe()}: {result.failure}"
        else:
            for why in ("interrupted", "pruned", "max_epochs", "early_stopping"):
                if why in reasons:
                    record.stopped_by = why
                    break
        epochs = [m.kept_epoch or 0 for m in record.members]
        kept = statistics.median_low(epochs) if epochs else 0
        sign = 1 if lower_is_better(metric) else -1
        values = [sign * m.kept[metric] if metric in m.kept else math.inf for m in record.members]
        best = values.index(min(values)) if values else 0
    if record.outcome == "COMPLETE":
        record.kept_epoch = kept
        if every:
            record.weights = {
                f"member{i}.{k}": v.detach().cpu()
                for i in range(len(p.members)) for k, v in p.models[i].state_dict().items()
            }  # fmt: skip
        else:
            record.weights = {k: v.detach().cpu() for k, v in p.models[best].state_dict().items()}
        if timed:
            record.inference_ms = measure_inference(p.models[best], data.val[0])
    if record.outcome in ("COMPLETE", "PRUNED") and record.history:
        chance = chance_loss(data.task, data.n_outputs, data.info.get("class_counts"))
        fit_ = diagnose_fit(
            record.history,
            record.kept_epoch,
            chance,
            p.job.peer_val_losses,
            record.stopped_by,
            lr=p.job.config.lr,
        )
        record.fit, record.fit_evidence = fit_.label, fit_.evidence
    return record
