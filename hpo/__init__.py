"""hpo: hyperparameter experiments for PyTorch multilayer perceptrons.

`hpo.run(spec, ...)` runs a study and returns its `Result`; `hpo.load(name, ...)` reads a
finished one back; `hpo.report` and `hpo.compare` write what the commands write (see
`hpo.api`). They are imported on first use: `import hpo` is cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "__version__", "compare", "load", "report", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "load", "report", "compare", "Result"):
        from hpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
