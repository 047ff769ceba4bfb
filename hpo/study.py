"""Samplers, pruners, storage, the objective, resume, and the final test evaluation."""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo import __version__
from hpo.config import Spec, SpecError, metric_direction
from hpo.data import Data, load_data, resolve_device
from hpo.diagnose import chance_loss, diagnose_fit
from hpo.model import build_mlp, count_parameters
from hpo.space import grid_space, suggest_params
from hpo.tracking import Tracker, resolve_uri
from hpo.train import TrainConfig, evaluate, train

DEFAULT_STORAGE = "sqlite:///optuna.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# A running trial writes a heartbeat to the storage; one silent for GRACE_S seconds belonged to
# a process that died (killed, out of memory, machine lost) and is failed by the next trial start.
HEARTBEAT_S = 20
GRACE_S = 120


# ---------------------------------------------------------------- registries

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "qmc": optuna.samplers.QMCSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "patient": optuna.pruners.PatientPruner,
    "none": optuna.pruners.NopPruner,
}


def _check_options(where: str, what: str, cls: type, opts: dict, skip: tuple = ()) -> None:
    allowed = [p for p in inspect.signature(cls).parameters if p not in skip] or ["no options"]
    unknown = [k for k in opts if k not in allowed]
    if unknown:
        raise SpecError(
            [
                f"{where}.{k}: not an option of the {what}; allowed: {', '.join(allowed)}"
                for k in unknown
            ]
        )


def make_sampler(spec: Spec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler a spec names, with its options; bad options raise `SpecError`."""
    s = spec.study.sampler
    seed = s.seed if seed is None else seed
    cls = SAMPLERS[s.name]
    _check_options("study.sampler", f"{s.name} sampler", cls, s.options, ("seed", "search_space"))
    try:
        if s.name == "grid":
            return cls(grid_space(spec.space), seed=seed)
        return cls(seed=seed, **s.options)
    except (TypeError, ValueError) as e:
        raise SpecError([f"study.sampler: {e}"]) from None


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The pruner a spec names, fed by per-epoch values; bad options raise `SpecError`."""
    name, opts = spec.study.pruner.name, spec.study.pruner.options
    try:
        if name != "patient":
            return _pruner(spec, name, opts)
        # patient: {patience: 2, min_delta: 0.0, wrapped: median, ...options of the wrapped one}
        own = {k: opts.pop(k) for k in ("patience", "min_delta") if k in opts}
        wrapped = opts.pop("wrapped", "median")
        if wrapped not in PRUNERS or wrapped == "patient":
            allowed = ", ".join(p for p in PRUNERS if p != "patient")
            raise SpecError([f"study.pruner.wrapped: must be one of {allowed} (got {wrapped!r})"])
        inner = _pruner(spec, wrapped, opts)
        return optuna.pruners.PatientPruner(inner, **{"patience": 2, **own})
    except (TypeError, ValueError) as e:
        raise SpecError([f"study.pruner: {e}"]) from None


def _pruner(spec: Spec, name: str, opts: dict[str, Any]) -> optuna.pruners.BasePruner:
    cls = PRUNERS[name]
    _check_options("study.pruner", f"{name} pruner", cls, opts)
    defaults: dict[str, Any] = {
        "percentile": {"percentile": 25.0},
        "hyperband": {"min_resource": 1, "max_resource": spec.training.max_epochs},
    }.get(name, {})
    return cls(**{**defaults, **opts})


def check_spec(spec: Spec) -> None:
    """The checks that need Optuna: sampler and pruner options."""
    problems: list[str] = []
    for build in (lambda: make_sampler(spec), lambda: make_pruner(spec)):
        try:
            build()
        except SpecError as e:
            problems += e.problems
    if problems:
        raise SpecError(problems)


def resolve_storage(spec: Spec, cli_storage: str | None = None) -> str:
    """study.storage, else --storage, else sqlite:///optuna.db in the working folder."""
    return spec.study.storage or cli_storage or DEFAULT_STORAGE


# ---------------------------------------------------------------- running a study


@dataclass
class Progress:
    """What the CLI shows after each finished trial."""

    done: int
    total: int
    trial: FrozenTrial
    best_value: float | None
    best_number: int | None
    elapsed: float
    eta: float | None


@dataclass
class StudyResult:
    study_name: str
    storage: str
    tracking_uri: str
    metric: str
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    test_metrics: dict[str, float]
    parent_run_id: str | None
    device: str
    interrupted: bool = False
    fit_counts: dict[str, int] = field(default_factory=dict)
    new_trials: int = 0
    wall_time: float = 0.0
    data_info: dict[str, Any] = field(default_factory=dict)


def was_interrupted(trial: FrozenTrial) -> bool:
    """Cut short by Ctrl-C (marked `interrupted`), or failed without a reason of its own: its
    process died and the heartbeat check failed it. Such a trial does not count toward n_trials."""
    if trial.state != TrialState.FAIL:
        return False
    return bool(trial.user_attrs.get("interrupted")) or "fail_reason" not in trial.user_attrs


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state, with the interrupted ones (see `was_interrupted`) apart from FAIL."""
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    counts["INTERRUPTED"] = sum(was_interrupted(t) for t in trials)
    counts["FAIL"] -= counts["INTERRUPTED"]
    return counts


def count_finished(study: optuna.Study) -> int:
    """Finished trials toward n_trials: complete, pruned and failed, not the interrupted ones."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return sum(1 for t in trials if not was_interrupted(t))


def run_study(
    spec: Spec,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    seed: int | None = None,
    on_trial_end: Callable[[Progress], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> StudyResult:
    """Run (or resume) the study a spec describes; evaluate the best model once on the test split.

    Ctrl-C stops it cleanly: the interrupted trial does not count, the test evaluation still
    runs, every MLflow run is closed, and `StudyResult.interrupted` is set.
    """
    name = study_name or spec.name
    storage_url = resolve_storage(spec, storage)
    uri = resolve_uri(spec.tracking.uri, tracking_uri)
    pruner = make_pruner(spec)
    device = resolve_device(spec.training.device)
    data = load_data(spec, device)

    # Everything that can refuse the run does so before the study or any run is written.
    fingerprint = spec.fingerprint()
    direction = metric_direction(spec.study.metric)
    opened = open_storage(storage_url, heartbeat=True)
    stored, n_before = _refuse_changed_spec(
        opened, storage_url, name, fingerprint, data.info["split_hash"]
    )
    if seed is None:
        seed = stored.get("seed")  # a resumed study keeps the --seed it started with
    base_seed = seed if seed is not None else (spec.study.sampler.seed or 0)
    sampler_seed = seed if seed is not None else spec.study.sampler.seed
    if sampler_seed is not None:
        # A resumed sampler starting from the same seed would replay the first run's random
        # draws (random search would repeat its first configurations): move it on by the number
        # of trials already there, which keeps it deterministic for the same interruptions.
        sampler_seed += n_before
    sampler = make_sampler(spec, seed=sampler_seed)
    tracker = Tracker(uri, spec.tracking.experiment or name)
    study = optuna.create_study(
        study_name=name,
        storage=opened,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a process that died
    attrs = study.user_attrs
    if "spec_hash" not in attrs:
        for k, v in {
            "spec_hash": fingerprint,
            "hpo_version": __version__,
            "metric": spec.study.metric,
            "data": data.info,
            "spec_yaml": spec.to_yaml(),
            "spec_dir": str(Path(spec.source_dir).resolve()),
            "seed": seed,  # the --seed override, if any
        }.items():
            study.set_user_attr(k, v)

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
        tags={"hpo.study": name, "hpo.storage": storage_url, "hpo.spec_hash": fingerprint},
    )
    if attrs.get("mlflow_parent_run_id") != parent_id:
        study.set_user_attr("mlflow_parent_run_id", parent_id)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("tracking_uri", uri)
    tracker.log_text(spec.to_yaml(), "spec.yaml")

    objective = _Objective(spec, data, tracker, base_seed, device)
    total = spec.study.n_trials
    remaining = max(total - count_finished(study), 0)
    if on_start is not None:
        on_start(
            {
                "name": name,
                "data": data.info,
                "device": str(device),
                "storage": storage_url,
                "tracking_uri": uri,
                "done": total - remaining,
                "total": total,
            }
        )
    started = time.perf_counter()
    durations: list[float] = []
    interrupted = False
    status = "FAILED"  # an unexpected error; Ctrl-C gives KILLED

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        done = count_finished(study)
        if trial.duration is not None:
            durations.append(trial.duration.total_seconds())
        if done >= total:
            study.stop()  # other processes on the same study count toward the same total
        if on_trial_end is not None:
            best = best_or_none(study)
            mean = sum(durations) / len(durations) if durations else None
            on_trial_end(
                Progress(
                    done=done,
                    total=total,
                    trial=trial,
                    best_value=best.value if best else None,
                    best_number=best.number if best else None,
                    elapsed=time.perf_counter() - started,
                    eta=mean * max(total - done, 0) if mean is not None else None,
                )
            )

    try:
        if remaining > 0:
            try:
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=spec.study.timeout,
                    catch=(Exception,),
                    callbacks=[after_trial],
                    gc_after_trial=False,
                )
            except KeyboardInterrupt:
                interrupted = True
        status = "KILLED"  # until the test evaluation is through: a second Ctrl-C lands here
        test_metrics = _evaluate_best_once(study, spec, data, tracker, objective)
        status = "KILLED" if interrupted else "FINISHED"
    finally:
        tracker.close_parent(status)

    best = best_or_none(study)
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    fits = [t.user_attrs["fit"] for t in trials if "fit" in t.user_attrs]
    fit_counts = {label: fits.count(label) for label in ("good", "overfit", "underfit")}
    return StudyResult(
        study_name=name,
        storage=storage_url,
        tracking_uri=uri,
        metric=spec.study.metric,
        counts=counts,
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=best.user_attrs.get("config", best.params) if best else {},
        test_metrics=test_metrics,
        parent_run_id=parent_id,
        device=str(device),
        interrupted=interrupted,
        fit_counts=fit_counts,
        new_trials=len(durations),
        wall_time=time.perf_counter() - started,
        data_info=data.info,
    )


def _refuse_changed_spec(
    storage: optuna.storages.BaseStorage,
    storage_url: str,
    name: str,
    fingerprint: str,
    split_hash: str,
) -> tuple[dict[str, Any], int]:
    """Refuse to resume a study whose spec or data changed; else its attributes and trial count."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}, 0
    old_split = existing.user_attrs.get("data", {}).get("split_hash")
    if old_split is not None and old_split != split_hash:
        raise SpecError(
            [
                f"dataset: the data of study {name!r} changed since it started (split hash "
                f"{old_split} vs {split_hash}); to start a new study, change `name:` in the spec "
                f"or pass --study-name NEW_NAME"
            ]
        )
    old = existing.user_attrs.get("spec_hash")
    if old is not None and old != fingerprint:
        raise SpecError(
            [
                f"name: study {name!r} in {storage_url} was run with a different spec "
                f"(data, search space, training or metric changed; hash {old} vs {fingerprint}); "
                f"to start a new study, change `name:` in the spec or pass --study-name NEW_NAME"
            ]
        )
    return existing.user_attrs, len(existing.get_trials(deepcopy=False))


def best_or_none(study: optuna.Study) -> FrozenTrial | None:
    """The study's best trial, or None while no trial has completed."""
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _build(config: dict[str, Any], data: Data, device: torch.device) -> torch.nn.Module:
    return build_mlp(
        data.n_features,
        data.n_outputs,
        config["widths"],
        config["activation"],
        config["dropout"],
        config["batchnorm"],
        config["init"],
    ).to(device)


def _train_config(spec: Spec, data: Data, config: dict[str, Any], seed: int) -> TrainConfig:
    es = spec.training.early_stopping
    return TrainConfig.from_params(
        config,
        task=data.task,
        max_epochs=spec.training.max_epochs,
        monitor=es.monitor,
        patience=es.patience,
        min_delta=es.min_delta,
        restore_best=es.restore_best,
        seed=seed,
        y_scale=data.y_scale,
    )


def spec_of(study: optuna.Study) -> Spec:
    """The spec a study was run from, as stored with it."""
    import yaml

    from hpo.config import parse_spec

    text = study.user_attrs.get("spec_yaml")
    if not text:
        raise SpecError([f"study {study.study_name!r} has no stored spec (not run by hpo?)"])
    return parse_spec(yaml.safe_load(text), source_dir=study.user_attrs.get("spec_dir", "."))


def retrain_best(
    study: optuna.Study, seeds: list[int], device: str | None = None
) -> list[dict[str, float]]:
    """Retrain a study's best configuration once per seed: validation and test metrics of each.

    For judging seed noise after the search (`hpo compare --reseed`); the study is not changed.
    """
    spec = spec_of(study)
    dev = resolve_device(device or spec.training.device)
    data = load_data(spec, dev)
    test = data.take_test()
    config = study.best_trial.user_attrs["config"]
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = _build(config, data, dev)
        cfg = _train_config(spec, data, config, seed)
        result = train(model, data.train, data.val, cfg)
        if result.failure:
            rows.append({"seed": seed, "failure": result.failure})
            continue
        val = {k: v for k, v in result.best.items() if k.startswith("val_")}
        tested = {f"test_{k}": v for k, v in evaluate(model, test, cfg).items()}
        rows.append({"seed": seed, **val, **tested, "epochs": len(result.history)})
    return rows


class _Objective:
    """One trial: sample, build, train with pruning, log to MLflow, keep the best weights."""

    def __init__(self, spec: Spec, data: Data, tracker: Tracker, seed: int, device: torch.device):
        self.spec, self.data, self.tracker = spec, data, tracker
        self.seed, self.device = seed, device
        self.metric = spec.study.metric
        self.best_model: tuple[int, torch.nn.Module] | None = None

    def build(self, config: dict[str, Any]) -> torch.nn.Module:
        return _build(config, self.data, self.device)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except Exception as e:
            # A failure before training started (sampling, building) still gets its reason: a
            # failed trial without one is taken for a trial whose process died.
            if "fail_reason" not in trial.user_attrs and not isinstance(e, optuna.TrialPruned):
                trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            raise

    def _run(self, trial: optuna.Trial) -> float:
        spec = self.spec
        config = suggest_params(trial, spec.space)
        trial_seed = self.seed * 100_003 + trial.number
        torch.manual_seed(trial_seed)
        model = self.build(config)
        cfg = _train_config(spec, self.data, config, trial_seed)
        trial.set_user_attr("config", config)
        trial.set_user_attr("seed", trial_seed)  # torch seed: retraining with it repeats the trial
        trial.set_user_attr("n_params", count_parameters(model))
        run_id = self.tracker.start_trial(trial.number)
        trial.set_user_attr("mlflow_run_id", run_id)
        history: list[dict[str, float]] = []

        def report(epoch: int, metrics: dict[str, float]) -> None:
            history.append(metrics)
            trial.report(metrics[self.metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        state, final, tags = "FAIL", {}, {}
        try:
            result = train(model, self.data.train, self.data.val, cfg, on_epoch_end=report)
            history = result.history
            if result.failure:
                raise FloatingPointError(result.failure)
            final = {
                f"best_{k}": v for k, v in result.best.items() if k.startswith(("train", "val"))
            }
            final["best_epoch"] = result.best_epoch
            for k, v in (
                ("best_epoch", result.best_epoch),
                ("epochs_run", len(history)),
                ("stopped_early", result.stopped_early),
                ("metrics", result.best),
            ):
                trial.set_user_attr(k, v)
            value = result.best[self.metric]
            stopped_by = "early_stopping" if result.stopped_early else "max_epochs"
            self._diagnose(trial, history, result.best_epoch, stopped_by, tags)
            self._keep_if_best(trial, value, model, config, run_id)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            trial.set_user_attr("epochs_run", len(history))
            self._diagnose(trial, history, None, "pruned", tags)
            raise
        except KeyboardInterrupt:
            state = "KILLED"
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason)
            tags["hpo.fail_reason"] = reason[:5000]
            raise
        finally:
            params = {k: v for k, v in config.items() if k != "width"}  # widths lists them
            self.tracker.end_trial(run_id, state, params, history, final, tags)

    def _diagnose(self, trial, history, kept_epoch, stopped_by, tags) -> None:
        """Store the fit label and its evidence on the trial and, through tags, in MLflow."""
        done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        peers = [t.user_attrs["metrics"]["train_loss"] for t in done if "metrics" in t.user_attrs]
        chance = chance_loss(self.data.task, self.data.n_outputs)
        fit = diagnose_fit(history, kept_epoch, chance, peers, stopped_by)
        trial.set_user_attr("fit", fit.label)
        trial.set_user_attr("fit_evidence", fit.evidence)
        tags["hpo.fit"], tags["hpo.fit_evidence"] = fit.label, fit.evidence

    def _keep_if_best(self, trial, value, model, config, run_id) -> None:
        best = best_or_none(trial.study)
        better = best is None or (
            value > best.value if trial.study.direction.name == "MAXIMIZE" else value < best.value
        )
        log_all = self.spec.tracking.log_model == "all"
        if better or log_all:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            self.tracker.save_checkpoint(run_id, state, config)
            trial.set_user_attr("checkpoint", True)
        if log_all:
            example = self.data.val[0][:5].detach().cpu().numpy()
            self.tracker.log_model(copy.deepcopy(model).cpu().eval(), example, run_id=run_id)
        if better:
            self.best_model = (trial.number, model)


def _evaluate_best_once(
    study: optuna.Study, spec: Spec, data: Data, tracker: Tracker, objective: _Objective
) -> dict[str, float]:
    """Evaluate the best trial's kept weights on the test split, once per best trial."""
    best = best_or_none(study)
    if best is None:
        return {}
    attrs = study.user_attrs
    if attrs.get("test_trial") == best.number and attrs.get("test_metrics"):
        return attrs["test_metrics"]  # this model already had its one look at the test split
    if objective.best_model and objective.best_model[0] == best.number:
        model = objective.best_model[1]
    else:
        model = objective.build(best.user_attrs["config"])
        state = tracker.load_checkpoint(best.user_attrs["mlflow_run_id"])
        model.load_state_dict(state)
    cfg = TrainConfig(task=data.task, y_scale=data.y_scale)
    X_test, y_test = data.take_test()
    test = {f"test_{k}": v for k, v in evaluate(model, (X_test, y_test), cfg).items()}
    study.set_user_attr("test_metrics", test)
    study.set_user_attr("test_trial", best.number)
    tracker.log_summary(
        {**test, f"best_{spec.study.metric}": best.value},
        {"hpo.best_trial": best.number, "hpo.test_trial": best.number},
    )
    if spec.tracking.log_model != "none":
        example = X_test[:5].detach().cpu().numpy()
        tracker.log_model(model.cpu().eval(), example)
    return test


def open_storage(url: str, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """The Optuna storage behind a URL; one that cannot be opened raises `SpecError`.

    With `heartbeat`, running trials record a heartbeat, and trials of a process that died are
    failed once they have been silent for `GRACE_S` seconds (see `was_interrupted`).
    """
    kw: dict[str, Any] = {}
    if heartbeat:
        kw = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.get_storage(optuna.storages.RDBStorage(url, **kw))
    except Exception as e:  # noqa: BLE001 - a malformed URL, a missing driver, no server
        raise SpecError([f"storage: cannot open {url!r}: {e}"]) from None


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
            best=best.value if best else None,
            test=", ".join(f"{k}={v:.4f}" for k, v in test.items()),
        )
        rows.append(row)
    return rows
