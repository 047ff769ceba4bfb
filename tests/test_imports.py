"""Importing hpo changes nothing global: no logger, warning filter, environment variable or
torch setting. Only `hpo.cli.main` (the command line) configures those, and only for itself."""

from __future__ import annotations

import json
import subprocess
import sys

# Every hpo module, imported; prints the other modules that brought in.
MODULES = r"""
import importlib, json, pkgutil, sys
import hpo
names = sorted(m.name for m in pkgutil.walk_packages(hpo.__path__, "hpo."))
for name in names:
    importlib.import_module(name)
others = sorted(m for m in sys.modules if m != "hpo" and not m.startswith("hpo."))
print(json.dumps({"hpo": names, "others": others}))
"""

# The libraries first (what they do to the process when imported is theirs), then hpo's
# modules: what changed between the two snapshots is hpo's doing.
SNAPSHOT = r"""
import importlib, json, logging, os, sys, warnings
modules = json.loads(sys.argv[1])
for name in modules["others"]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
import torch

def state():
    loggers = {name: (lg.level, len(lg.handlers), lg.propagate, lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items()
               if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    tiny = torch.full((1,), 0x00400000, dtype=torch.int32).view(torch.float32)
    return {
        "loggers": loggers,
        "root": (root.level, len(root.handlers), logging.root.manager.disable),
        "filters": [repr(f) for f in warnings.filters],
        "showwarning": repr(warnings.showwarning),
        "environ": dict(os.environ),
        "torch": [torch.get_num_threads(), repr(torch.get_default_dtype()),
                  torch.get_float32_matmul_precision(), bool((tiny * 1.0).eq(0).item())],
    }

before = state()
for name in modules["hpo"]:
    importlib.import_module(name)
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
if "loggers" in changed:  # only what differs
    b, a = changed["loggers"]
    changed["loggers"] = {n: (b.get(n), a[n]) for n in a if b.get(n) != a[n]}
print(json.dumps(changed, default=str))
"""


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_importing_every_hpo_module_changes_no_global_state():
    modules = _run(MODULES)
    assert {"hpo.study", "hpo.train", "hpo.tracking"} <= set(json.loads(modules)["hpo"])
    assert json.loads(_run(SNAPSHOT, modules)) == {}
