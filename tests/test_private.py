"""The fence around the private torch APIs hpo calls (`hpo/_private.py`): each is checked
against the installed torch, so an upgrade that renames or removes one fails here, by name,
and no private call is made from anywhere else in hpo."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

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
