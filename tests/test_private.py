"""The fence around the private torch and Optuna APIs hpo calls (`hpo/_private.py`): each is
checked against the installed versions, so an upgrade that renames or removes one fails here,
by name, and no private call is made from anywhere else in hpo."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import optuna
import torch

from hpo import _private

HPO = Path(__file__).parent.parent / "hpo"


def test_the_capturable_warning_flag_is_the_one_torch_reads():
    assert _private.CAPTURABLE_WARNED in inspect.getsource(torch.optim.Optimizer), (
        "torch no longer reads the flag that silences its warning about capturable optimizers "
        "stepping outside a CUDA graph: see hpo/_private.py"
    )
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    _private.quiet_uncaptured_steps(opt)
    assert getattr(opt, _private.CAPTURABLE_WARNED) is True


def test_the_allocator_calls_after_a_failed_capture_exist():
    missing = [name for name in _private.POOL_RELEASES if not hasattr(torch._C, name)]
    assert not missing, f"torch._C lacks {missing}: see hpo/_private.py"


def _private_torch_calls(path: Path) -> list[str]:
    """`torch._x` and `torch.y._z` attribute reads in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.endswith("__")  # dunders are public
        ):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "torch":
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_torch_call_outside_the_fence():
    calls = [
        call
        for path in sorted(HPO.rglob("*.py"))
        if path.name != "_private.py"
        for call in _private_torch_calls(path)
    ]
    assert calls == []


def test_optunas_private_calls_still_do_what_hpo_relies_on(tmp_path):
    from optuna.trial import TrialState

    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    storage = _private.cached_storage(rdb)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert issubclass(optuna.storages.RDBStorage, _private.heartbeat_base())
    study = optuna.create_study(storage=storage)
    assert _private.storage_of(study) is storage
    trial = study.ask()
    assert _private.trial_id(trial) == study.trials[0]._trial_id
    assert _private.write_user_attrs(rdb, _private.trial_id(trial), {"a": 1, "b": [2]}), (
        "Optuna's one-transaction attribute write is gone: see hpo/_private.py"
    )
    assert rdb.get_trial(_private.trial_id(trial)).user_attrs == {"a": 1, "b": [2]}
    assert _private.cached_user_attrs(trial) is not None
    # samplers read the study's trials through the method TrialsSeenBy filters
    seen = _private.TrialsSeenBy(study, lambda t: t.number > 0)
    study.tell(trial, 1.0)
    study.tell(study.ask(), 2.0)
    assert [t.number for t in seen.get_trials()] == [1]
    # a queued trial taken by `ask` holds its parameters apart until it suggests them
    study.enqueue_trial({"x": 3.0})
    popped = study.ask()
    assert _private.queued_params(study.trials[popped.number]) == {"x": 3.0}
    study.tell(popped, state=TrialState.FAIL)
    assert [t.number for t in seen._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))] == [
        1
    ]
    import inspect

    assert "_get_trials" in inspect.getsource(optuna.samplers.TPESampler), (
        "Optuna's samplers no longer read trials through Study._get_trials: see TrialsSeenBy"
    )


def test_the_grid_sampler_still_stops_the_study_with_the_text_hpo_reads():
    """Telling the trial that walks the last grid point raises (outside `optimize`) the
    RuntimeError whose text the driver reads to ask for no more trials."""
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [0, 1]}))
    raised = []
    for _ in range(2):
        trial = study.ask()
        trial.suggest_categorical("x", [0, 1])
        try:
            study.tell(trial, 0.0)
        except RuntimeError as e:
            raised.append(str(e))
    assert len(raised) == 1 and _private.GRID_STOPPED in raised[0], raised
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_no_private_optuna_call_outside_the_fence():
    names = ("._storage", "._trial_id", "._get_trials", "._cached_frozen_trial", "storages._")
    found = [
        f"{path.name}: {name}"
        for path in sorted(HPO.rglob("*.py"))
        if path.name != "_private.py"
        for name in names
        if name in path.read_text()
    ]
    assert found == []
