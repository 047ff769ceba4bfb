"""Every private torch API hpo calls, in one place, each with why it is worth it.

`tests/test_private.py` checks each against the installed version, so an upgrade that removes
or renames one fails there, loudly, and not in a user's study; pyproject bounds torch above
the versions that test has passed on.
"""

from __future__ import annotations

import contextlib

import torch

# Set on an optimizer to silence the warning torch gives once when a `capturable` optimizer
# steps outside a CUDA graph. hpo's warm-up steps and each epoch's shorter last batch do so by
# design (see `hpo.train.StepGraph`); read in `torch.optim.Optimizer`'s capture health check.
CAPTURABLE_WARNED = "_warned_capturable_if_run_uncaptured"

# The allocator calls that end a capture's use of its memory pool, which a failed
# `capture_end` leaves open (then `empty_cache` and its out-of-memory retry do nothing).
POOL_RELEASES = ("_cuda_endAllocateToPool", "_cuda_releasePool")


def quiet_uncaptured_steps(opt: torch.optim.Optimizer) -> None:
    """No warning when `opt` (capturable) steps outside a CUDA graph."""
    setattr(opt, CAPTURABLE_WARNED, True)


def end_capture_pool(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """After a failed capture, tell the allocator the capture is over."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with contextlib.suppress(Exception):
        pool = graph.pool()
        for release in POOL_RELEASES:
            with contextlib.suppress(Exception):
                getattr(torch._C, release)(index, pool)
