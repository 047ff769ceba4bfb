"""What can refuse a run before anything is written: the data and the memory a search space
needs, the storage to use, and a resumed study whose spec or data changed."""

from __future__ import annotations

import os
from typing import Any

import optuna
import torch

from hpo import resources
from hpo.config import Spec, SpecError
from hpo.data import Data, load_data, resolve_device
from hpo.redact import redact, redact_url
from hpo.storage import DEFAULT_STORAGE
from hpo.train import precision_warning


def check_memory(spec: Spec, data: Data, devices: list[str]) -> None:
    """Refuse (SpecError) a search space whose largest model does not fit where it would run,
    as many times as trials run at once on one device, fused ones included (see
    `resources.check_fits`)."""
    problems: list[str] = []
    shape = resources.Shape.of(data)
    members = spec.training.repeats * (spec.dataset.split.folds or 1)  # a trial's stack
    for dev in sorted(set(devices)):
        problems += resources.check_fits(
            spec, shape, torch.device(dev), devices.count(dev), spec.study.fused_trials * members
        )
    if problems:
        raise SpecError(problems)


def check_data(spec: Spec) -> tuple[str, list[str]]:
    """Load the data as `hpo run` would (a dataset not on this machine yet is downloaded into
    the cache, as the run would), and check that the largest model fits the device: what
    `hpo validate` adds to the spec's own checks. Returns (what was checked, warnings): why
    the data could not be checked, when it is not here and no download could fetch it (the
    spec itself is sound; `hpo run` will need the files or a network), and a precision this
    device would emulate."""
    from hpo.data import NotDownloaded

    device = resolve_device(spec.training.device)
    slow = precision_warning(spec.training.precision, device)
    warnings = [slow] if slow else []
    try:
        data = load_data(spec, "cpu")
    except NotDownloaded as e:
        return "", [f"data not checked: {e.problems[0]}", *warnings]
    check_memory(spec, data, [str(device)])
    info = data.info
    checked = (
        f"data: {info['n_train']:,} train / {info['n_val']:,} val / {info['n_test']:,} test, "
        f"{info['n_features']} features"
        + (f", {info['n_classes']} classes" if info["n_classes"] else "")
    )
    return checked, warnings


def resolve_storage(spec: Spec | None, cli_storage: str | None = None) -> str:
    """--storage (or the API's `storage`), else $HPO_STORAGE, else study.storage, else
    sqlite:///optuna.db in the working folder: the command line, the environment, the spec."""
    in_spec = spec.study.storage if spec is not None else None
    return cli_storage or os.environ.get("HPO_STORAGE") or in_spec or DEFAULT_STORAGE


def refuse_changed_spec(
    storage: optuna.storages.BaseStorage,
    storage_url: str,
    name: str,
    fingerprints: tuple[str, ...],
    info: dict[str, Any],
) -> dict[str, Any]:
    """Refuse to resume a study whose spec or data changed (`fingerprints`: the spec's hash,
    then the ones a study stored by an older hpo may have; `info`: the data's, whose split,
    features and classes must be the study's); else its attributes."""
    split_hash = info["split_hash"]
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}
    old_info = existing.user_attrs.get("data", {})
    for key, what in (("n_features", "inputs"), ("n_classes", "classes")):
        if key in old_info and old_info[key] != info.get(key):
            # e.g. one-hot columns that a test file added, before hpo learned them from the
            # training file only: the stored trials' weights would not fit the new models
            raise SpecError(
                [
                    f"dataset: the data of study {name!r} now gives {info.get(key)} {what} "
                    f"where its trials had {old_info[key]}; to start a new study, change "
                    "`name:` in the spec or pass --study-name NEW_NAME"
                ]
            )
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
    if old is not None and old not in fingerprints:
        raise SpecError(
            [
                f"name: study {name!r} in {redact_url(storage_url)} was run with a different spec "
                f"(data, search space, training or metric changed; hash {old} vs "
                f"{fingerprints[0]}); "
                f"to start a new study, change `name:` in the spec or pass --study-name NEW_NAME"
            ]
        )
    return existing.user_attrs


def stored_yaml(spec: Spec) -> str:
    """The spec's text as a study stores it: without the passwords of its URLs."""
    text = spec.to_yaml()
    for url in (spec.study.storage, spec.tracking.uri):
        if url:
            text = text.replace(url, redact_url(url) or "")
    return redact(text)
