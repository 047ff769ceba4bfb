"""The registries: one place names each dataset, sampler, pruner, activation, optimizer, init
and schedule; the spec, its errors, `hpo names` and docs/spec.md follow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_spec
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import SpecError, parse_spec
from hpo.data import load_data
from hpo.model import build_mlp
from hpo.optim import make_optimizer
from hpo.registry import ALL, DATASETS, OPTIMIZERS, Entry, sync_names
from hpo.train import TrainConfig

SPEC_DOC = Path(__file__).parent.parent / "docs" / "spec.md"  # its Names section


@pytest.mark.parametrize("kind", list(ALL))
def test_every_name_loads_its_code(kind):
    reg = ALL[kind]
    assert len(reg) >= 3
    for name in reg:
        assert callable(reg.load(name)), f"{kind}: {name} -> {reg[name].target}"


def test_the_readme_lists_exactly_the_registered_names(tmp_path):
    copy = tmp_path / "spec.md"
    shutil.copy(SPEC_DOC, copy)
    assert not sync_names(str(copy)), "docs/spec.md's names are stale: run `make docs`"
    for reg in ALL.values():
        for name in reg:
            assert f"- `{name}`: {reg[name].doc}" in SPEC_DOC.read_text()


def test_config_reads_the_names_without_importing_torch_or_optuna():
    code = (
        "import sys, hpo.config; "
        "print(sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_name_added_in_the_registry_is_accepted_everywhere(monkeypatch):
    """One entry is all it takes: the spec accepts it, the loader and trainer use it."""
    monkeypatch.setitem(
        DATASETS._entries, "digits_copy", Entry("digits_copy", "hpo.data:load_digits", "test")
    )
    monkeypatch.setitem(
        OPTIMIZERS._entries, "asgd", Entry("asgd", "torch.optim:ASGD", "averaged SGD")
    )
    spec = parse_spec(
        small_spec(dataset={"name": "digits_copy"}, search_space={"optimizer": "asgd"})
    )
    data = load_data(spec)
    assert data.info["dataset"] == "digits_copy" and data.n_features == 64
    opt = make_optimizer(
        list(build_mlp(4, 2).parameters()), TrainConfig(optimizer="asgd", lr=0.02)
    )
    assert isinstance(opt, torch.optim.ASGD) and opt.param_groups[0]["lr"] == 0.02


def test_an_unknown_name_lists_the_registered_ones(monkeypatch):
    monkeypatch.setitem(
        DATASETS._entries, "digits_copy", Entry("digits_copy", "hpo.data:load_digits", "test")
    )
    with pytest.raises(SpecError) as e:
        parse_spec(small_spec(dataset={"name": "digits_cpy"}))
    assert e.value.problems == [
        "dataset.name: unknown dataset 'digits_cpy'; did you mean 'digits_copy'? allowed: "
        + ", ".join(DATASETS)
    ]


def test_names_command_lists_a_kind_or_refuses_an_unknown_one():
    result = CliRunner().invoke(app, ["names", "pruners"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "pruners (study.pruner.name):"
    assert [ln.split()[0] for ln in lines[1:]] == list(ALL["pruners"])
    bad = CliRunner().invoke(app, ["names", "optimisers"])
    assert bad.exit_code == 2 and "allowed: datasets, samplers" in bad.output


def test_a_name_in_other_case_or_by_another_name_is_pointed_to_the_right_one():
    space = {"activation": {"type": "categorical", "choices": ["relu", "Relu", "swish"]}}
    with pytest.raises(SpecError) as e:
        parse_spec(small_spec(search_space=space))
    problems = e.value.problems
    assert [p.split(" allowed:")[0] for p in problems] == [
        "search_space.activation.choices[1]: unknown activation 'Relu'; did you mean 'relu'?",
        "search_space.activation.choices[2]: unknown activation 'swish'; did you mean 'silu'?",
    ], problems


def test_each_optimizer_takes_only_settings_its_torch_class_accepts():
    import inspect

    from hpo.params import PARAMS

    for name, entry in OPTIMIZERS.items():
        accepted = inspect.signature(OPTIMIZERS.load(name)).parameters
        for setting in entry.takes:
            assert PARAMS[setting].optimizer_setting, f"{name}: {setting} is not a setting"
            assert setting in accepted, f"{name}'s class takes no {setting}"
    assert PARAMS["momentum"].optimizers == ("sgd", "rmsprop")
    assert PARAMS["nesterov"].optimizers == ("sgd",)
