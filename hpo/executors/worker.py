"""The loop every worker runs, whatever carries its messages: load the data once, then trials.

Messages in: ("run", TrialJob | CohortJob), ("decision", None | "pruned" | "interrupted"),
("exit",); a cohort's trials each get their own "start", "epoch" and "done" messages.
Messages out: ("ready", device), ("error", message), ("start", number, "host:pid"),
("epoch", number, epoch, metrics), ("done", number, TrialRecord).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

import torch

from hpo.config import Spec
from hpo.data import Data, load_data
from hpo.train import Flag, flush_denormals
from hpo.trial import run


class Channel(Protocol):
    def send(self, message: Any) -> None: ...

    def recv(self) -> Any: ...


def serve(
    channel: Channel,
    spec: Spec,
    device: str,
    threads: int | None = None,
    data: Data | None = None,
    interrupt: Flag | None = None,
) -> None:
    """Run trials sent over `channel` until told to exit (or the channel closes)."""
    flush_denormals()  # before the first torch operation starts the intra-op threads
    if threads:
        torch.set_num_threads(threads)
    try:
        data = data if data is not None else load_data(spec, device)
    except Exception as e:  # noqa: BLE001 - reported to the driver, which stops
        channel.send(("error", f"{type(e).__name__}: {e}"))
        return
    channel.send(("ready", device))
    while True:
        message = channel.recv()
        if message[0] != "run":
            return
        job = message[1]
        where = f"{socket.gethostname()}:{os.getpid()}"
        for number in job.numbers:
            channel.send(("start", number, where))
        run(
            job.members,
            spec,
            data,
            lambda metrics, epoch: _decisions(channel, metrics, epoch),
            lambda record: channel.send(("done", record.number, record)),
            interrupt,
        )


def _decisions(
    channel: Channel, metrics: dict[int, dict[str, float]], epoch: int
) -> dict[int, str | None]:
    """Report an epoch of each trial, then read the driver's answers, in the same order."""
    for number, m in metrics.items():
        channel.send(("epoch", number, epoch, m))
    answers: dict[int, str | None] = {}
    for number in metrics:
        reply = channel.recv()
        if reply[0] != "decision":  # told to exit: every trial still waiting stops here
            # (without reading on: the driver sends no more answers, and the next "exit" is
            # for the loop in `serve`)
            return answers | {n: "interrupted" for n in metrics if n not in answers}
        answers[number] = reply[1]
    return answers
