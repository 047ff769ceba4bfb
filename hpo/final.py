"""The end of a study in one process: the study's model (the chosen trial's kept weights, or
its refit with `dataset.split.final_model: refit` or folds) on the test split, once per
chosen trial and by the last process out, the best baseline's beside it (a reference, never
used to choose anything), and the deployable model logged."""

from __future__ import annotations

from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo.config import Spec
from hpo.data import Data
from hpo.objectives import Objectives, primary
from hpo.outage import Retry
from hpo.outcomes import best_of, best_or_none, compare_with_baselines
from hpo.params import TrialConfig
from hpo.redact import first_line, redact
from hpo.steppers import EVAL_BATCH
from hpo.storage import storage_lock
from hpo.tracker import Tracker
from hpo.train import TrainConfig, evaluate, train
from hpo.trial import build_model, train_config

CHAMPION = "champion"  # the registry alias of the study's model once it beats the baselines


def refit_epochs(trial: FrozenTrial) -> int:
    """The epochs a refit trains for: the trial's kept epoch, with members their median (the
    lower middle one of an even count: `hpo.trial._recorded`)."""
    return int(trial.user_attrs.get("best_epoch") or 1)


class Final:
    """The test evaluation and the model for one driver's study. `best_weights`: the weights
    of the best trial this process trained, kept in memory (the driver sets it), so that the
    test needs no download of its checkpoint."""

    def __init__(
        self, spec: Spec, data: Data, tracker: Tracker, url: str, lock_key: str, retry: Retry
    ):
        self.spec, self.data, self.tracker = spec, data, tracker
        self.url, self.lock_key, self.retry = url, lock_key, retry
        self.metric = spec.study.metric
        self.study: optuna.Study = None  # type: ignore[assignment]  # set by the driver
        self.best_weights: tuple[int, dict[str, torch.Tensor]] | None = None
        self._test: Any = None  # the test split, once taken
        self._refits_done: dict[int, torch.nn.Module] = {}  # trial number -> its refit

    def model(self, config: Any, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A trial's network holding `weights`; `config`: its `TrialConfig`, or as stored."""
        if isinstance(config, dict):
            config = TrialConfig.of(config)
        if any(k.startswith("member0.") for k in weights):  # a fold ensemble: each member's
            from hpo.ensemble import Averaged

            members: dict[int, dict[str, torch.Tensor]] = {}
            for key, tensor in weights.items():
                head, name = key.split(".", 1)
                members.setdefault(int(head.removeprefix("member")), {})[name] = tensor
            nets = [self.model(config, members[i]) for i in sorted(members)]
            classify = self.data.task == "classification"
            return Averaged([(1 / len(nets), net) for net in nets], classify)
        model = build_model(config, self.data, self.data.train[0].device)
        model.load_state_dict(weights)
        return model

    def deployable(self, model: torch.nn.Module) -> Any:
        """The network with the data's preprocessing built in (see hpo/serving.py)."""
        from hpo.ensemble import Averaged
        from hpo.serving import Predictor  # imports mlflow.pyfunc: only when a model is logged

        return Predictor(model.pairs if isinstance(model, Averaged) else model, self.data.prep)

    def evaluate(self) -> tuple[dict[str, float], str]:
        """The study's model (its kept weights or its refit) on the test split, once per chosen
        trial, by the last process out; then that model logged (again, if an earlier upload was
        cut short)."""
        with storage_lock(self.url, self.lock_key, self.retry):
            attrs = self.study.user_attrs
            if self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                note = "other processes are still training; the last one evaluates the best model"
                return attrs.get("test_metrics") or {}, note
            best = best_or_none(self.study)
            if best is None:
                return {}, ""
            cached = self.best_weights is not None and self.best_weights[0] == best.number
            refit = self._refits()
            if not (refit or cached or best.user_attrs.get("checkpoint")):
                # a tie an older hpo resolved the other way: no test metrics of another trial
                note = f"the best trial #{best.number} kept no weights: no test evaluation"
                return {}, note
            model = None
            if attrs.get("test_trial") == best.number and attrs.get("test_metrics"):
                test = attrs["test_metrics"]  # this model already had its one look at the test
            else:
                model = self._best_model(best)
                test = self._on_test(model)
                self.study.set_user_attr("test_metrics", test)
                self.study.set_user_attr("test_trial", best.number)
                if refit:
                    rows = "training" if self.data.folds is not None else "train and validation"
                    how = (f"refit on all {len(self._pool()[0]):,} {rows} rows for "
                           f"{refit_epochs(best)} epochs")  # fmt: skip
                    self.study.set_user_attr("test_model", how)
                elif self.spec.dataset.split.final_model == "fold_ensemble":
                    n = len(best.user_attrs.get("members", []))
                    how = f"the mean of its {n} fold models (dataset.split.final_model)"
                    self.study.set_user_attr("test_model", how)
                self.tracker.log_summary(
                    {**test, f"best_{self.metric}": primary(best)},
                    {"hpo.best_trial": best.number, "hpo.test_trial": best.number},
                )
            self._test_best_baseline(best, test)
            wanted = self.spec.tracking.log_model != "none"
            if wanted and self.study.user_attrs.get("model_trial") != best.number:
                self.tracker.fail_pending_models()  # an upload a Ctrl-C cut short
                model = model or self._best_model(best)
                uri = self.tracker.log_model(self.deployable(model), self.data.raw_example)
                self.tracker.log_summary({}, {"hpo.model_uri": uri})
                self.study.set_user_attr("model_uri", uri)
                self.study.set_user_attr("model_trial", best.number)
                self._register(uri, best)
            if self.spec.tracking.ensemble is not None:
                self._ensemble()
        return test, ""

    def _register(self, uri: str, best: FrozenTrial) -> None:
        """The study's model in MLflow's model registry, under the study's name, with the
        alias `champion` moved onto it when it beats the best baseline on validation (or
        there is none): `models:/NAME@champion`."""
        c = compare_with_baselines(self.study)
        if c is not None and not (c.searched_number == best.number and c.beats()):
            return  # a baseline is the model, or the search did not beat it
        try:
            champion, version = self.tracker.register_model(uri, self.study.study_name, CHAMPION)
        except Exception as e:  # noqa: BLE001 - a store without a registry: the model stays
            why = redact(first_line(str(e)))
            self.study.set_user_attr("champion", {"error": why, "trial": best.number})
            return
        record = {"uri": champion, "version": version, "trial": best.number, "model_uri": uri}
        self.study.set_user_attr("champion", record)
        self.tracker.log_summary({}, {"hpo.champion": f"{champion} (version {version})"})

    def _ensemble(self) -> None:
        """`tracking.ensemble`: greedy selection (`hpo.ensemble.select`) from the best
        complete trials that kept their weights, on the validation split (with folds, on
        each candidate's out-of-fold predictions of the whole pool: every row predicted by
        the fold models that did not train on it); then the ensemble of the chosen trials'
        models (each one's refit, or with folds its fold ensemble, where the spec asks for
        them) on the test split, once,
        beside the best trial, and logged as the study run's `ensemble` model. Done again
        only when the candidates changed."""
        from hpo import ensemble

        conf = self.spec.tracking.ensemble
        assert conf is not None
        ranked = Objectives.of_study(self.study).ranked(
            self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        )
        kept = [t for t in ranked if t.user_attrs.get("checkpoint")][: conf.candidates]
        numbers = [t.number for t in kept]
        done = self.study.user_attrs.get("ensemble")
        if len(kept) < 2 or (done and done.get("candidates") == numbers):
            return
        classify = self.data.task == "classification"
        folds = self.data.folds is not None
        if folds:
            y = self.data.train[1]
            selecting = [self._out_of_fold(t) for t in kept]
        else:
            y = self.data.val[1]
            selecting = [_outputs(self._weights_of(t), self.data.val[0]) for t in kept]
        counts = ensemble.select(selecting, y, classify, self.metric, conf.size)
        chosen = [(c / conf.size, t) for c, t in zip(counts, kept, strict=True) if c]
        weights = [w for w, _ in chosen]
        val = ensemble.scores(
            ensemble.combine([o for o, c in zip(selecting, counts, strict=True) if c], weights,
                             classify), y, classify, self.data.y_scale,
        )  # fmt: skip
        models = [self.refit(t) if self._refits() else self._weights_of(t) for _, t in chosen]
        X_test, y_test = self._test_split()
        test = ensemble.scores(
            ensemble.combine([_outputs(m, X_test) for m in models], weights, classify),
            y_test, classify, self.data.y_scale,
        )  # fmt: skip
        record = {
            "candidates": numbers,
            "members": {str(t.number): w for w, t in chosen},
            "size": conf.size,
            "selected_on": f"out-of-fold predictions of {len(y):,} pool rows"
            if folds
            else f"{len(y):,} validation rows",
            **{f"val_{k}": v for k, v in val.items()},
            **{f"test_{k}": v for k, v in test.items()},
        }
        members = ", ".join(f"#{n} x{w:g}" for n, w in record["members"].items())
        self.tracker.log_summary(
            {f"ensemble_{k}": v for k, v in record.items() if isinstance(v, float)},
            {"hpo.ensemble_members": members},
        )
        from hpo.ensemble import Averaged
        from hpo.serving import Predictor

        pairs = []  # a fold ensemble's networks each take their share of its weight
        for w, m in zip(weights, models, strict=True):
            pairs += [(w * v, net) for v, net in m.pairs] if isinstance(m, Averaged) else [(w, m)]
        predictor = Predictor(pairs, self.data.prep)
        record["model_uri"] = self.tracker.log_model(
            predictor, self.data.raw_example, name="ensemble"
        )
        self.study.set_user_attr("ensemble", record)

    def _out_of_fold(self, trial: FrozenTrial) -> torch.Tensor:
        """A folds trial's predictions of every pool row by the members that validated on it
        (the mean of its repeats'), as raw outputs: log probabilities, or values."""
        from hpo.ensemble import TINY

        fold_models = self._weights_of(trial)  # an `Averaged` of every member
        X, _ = self.data.train
        classify = self.data.task == "classification"
        sums: torch.Tensor | None = None
        seen = torch.zeros(len(X), device=X.device)
        for member, net in zip(trial.user_attrs["members"], fold_models.nets, strict=True):
            rows = self.data.folds[member["fold"]][1]  # type: ignore[index]
            out = _outputs(net, X[rows])
            out = torch.softmax(out.float(), 1) if classify else out.float()
            if sums is None:
                sums = torch.zeros(len(X), out.shape[1], device=X.device)
            sums[rows] += out
            seen[rows] += 1
        assert sums is not None
        mean = sums / seen.clamp_min(1).unsqueeze(1)
        return torch.log(mean.clamp_min(TINY)) if classify else mean

    def _weights_of(self, trial: FrozenTrial) -> torch.nn.Module:
        """A trial's network holding its kept weights, for inference."""
        if self.best_weights is not None and self.best_weights[0] == trial.number:
            weights = self.best_weights[1]
        else:
            weights = self.tracker.load_checkpoint(trial.user_attrs["mlflow_run_id"])
        return self.model(trial.user_attrs["config"], weights).eval()

    def _on_test(self, model: torch.nn.Module) -> dict[str, float]:
        """A model's test_* metrics, computed as its validation metrics were."""
        cfg = TrainConfig(
            task=self.data.task, y_scale=self.data.y_scale, precision=self.spec.training.precision
        )
        return {f"test_{k}": v for k, v in evaluate(model, self._test_split(), cfg).items()}

    def _test_split(self) -> Any:
        """The test split, taken once for this process: the best trial's and the best
        baseline's evaluations share it."""
        if self._test is None:
            self._test = self.data.take_test()
        return self._test

    def _test_best_baseline(self, best: FrozenTrial, test: dict[str, float]) -> None:
        """The best baseline's kept weights on the test split, once, beside the best trial's:
        the reference the search is measured against (never used to choose anything)."""
        attrs = self.study.user_attrs
        bb = best_of(self.study, baseline=True)
        if bb is None or attrs.get("baseline_test_trial") == bb.number:
            return
        if bb.number == best.number:
            tested = test
        elif self._refits():
            tested = self._on_test(self.refit(bb))
        elif bb.user_attrs.get("checkpoint"):
            tested = self._on_test(self._weights_of(bb))
        else:
            return  # trained before baselines kept their weights
        self.study.set_user_attr("baseline_test_metrics", tested)
        self.study.set_user_attr("baseline_test_trial", bb.number)
        self.tracker.log_summary(
            {f"baseline_{k}": v for k, v in tested.items()},
            {"hpo.baseline_test_trial": bb.number},
        )

    def refit(self, trial: FrozenTrial) -> torch.nn.Module:
        """The model a trial stands for with `final_model: refit` (scikit-learn's `refit`):
        its configuration trained on the whole training pool (train and validation), with the
        trial's seed and schedule, stopped at its kept epoch (with members, their median). The
        same model in every process (its seed and rows are fixed); trained once per process
        (the best trial is often an ensemble member too)."""
        if trial.number in self._refits_done:
            return self._refits_done[trial.number]
        config = TrialConfig.of(trial.user_attrs["config"])
        seed = trial.user_attrs.get("seed", 0)
        torch.manual_seed(seed)
        model = build_model(config, self.data, self.data.train[0].device)
        cfg = train_config(self.spec, self.data, config, seed)
        epochs = refit_epochs(trial)
        # The members' schedule (a cosine over max_epochs), stopped at their median kept epoch.
        cfg.patience, cfg.restore_best = cfg.max_epochs + 1, False
        stop = lambda epoch, metrics: "max_epochs" if epoch >= epochs else None  # noqa: E731
        # Its validation metrics mean nothing (those rows are in the pool) and decide nothing:
        # the smallest split there is keeps their cost per epoch small.
        train(model, self._pool(), self.data.val, cfg, on_epoch_end=stop)
        self._refits_done[trial.number] = model
        return model

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows a refit trains on: the pool (with folds, `data.train` is the pool)."""
        if self.data.folds is not None:
            return self.data.train
        (X, y), (Xv, yv) = self.data.train, self.data.val
        return torch.cat([X, Xv]), torch.cat([y, yv])

    def _refits(self) -> bool:
        """Whether the tested model is a refit: `final_model: refit`, the default with folds."""
        split = self.spec.dataset.split
        return split.final_model == "refit" or (
            split.final_model is None and split.folds is not None
        )

    def _best_model(self, best: FrozenTrial) -> torch.nn.Module:
        return self.refit(best) if self._refits() else self._weights_of(best)


def _outputs(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """A network's raw outputs for the rows `X`, in large batches, without gradients."""
    with torch.inference_mode():
        return torch.cat([model(X[i : i + EVAL_BATCH]) for i in range(0, len(X), EVAL_BATCH)])
