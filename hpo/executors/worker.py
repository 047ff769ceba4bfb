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

from hpo import resources
from hpo.config import Spec
from hpo.data import Data, load_data
from hpo.optim import warm_up
from hpo.train import Flag, flush_denormals
from hpo.trial import CohortJob, TrialJob, run


class Channel(Protocol):
    def send(self, message: Any) -> None: ...

    def recv(self) -> Any: ...

    def poll(self) -> bool: ...  # whether recv would return at once


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
    threads = threads or torch.get_num_threads()
    try:
        data = data if data is not None else load_data(spec, device)
        warm_up()
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
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads_for(job, data, threads))
        answers = _Answers(channel)
        run(
            job.members,
            spec,
            data,
            answers,
            lambda record: channel.send(("done", record.number, record)),
            interrupt,
        )
        if answers.settle():
            return


# A step of fewer multiply-adds than this (parameters x batch rows, every member of a cohort
# counted) trains on one CPU thread: see `threads_for`.
SMALL_STEP = 4_000_000


def threads_for(job: TrialJob | CohortJob, data: Data, threads: int) -> int:
    """Torch threads for a job on a CPU: `threads`, or one for a small step. On 2 cores a
    digits net's step (well under a million multiply-adds) is no faster on two threads, and
    with the driver busy on the other core (a digits epoch takes 20 ms, its bookkeeping a few)
    the second thread waits on it: a 30-trial digits study ran 1.7x as many trials an hour on
    one thread. A wide MNIST net's step (784-512-512 at batch 256: 170 million) is 1.7x faster
    on two, and its driver is idle."""
    config = job.members[0].config
    params = resources.of_config(config, resources.Shape.of(data), on_cpu=True).params
    work = params * config.batch_size * len(job.members)
    return 1 if work < SMALL_STEP else threads


# While a trial's epochs take less than this, it trains on without waiting for the driver's
# answers to its last epochs, at most `AHEAD` of them unread.
RUN_AHEAD_BELOW_S = 0.5
AHEAD = 4


class _Answers:
    """The driver's answers to a worker's epochs, as `hpo.trial.run`'s `on_epoch_end`.

    Every epoch message gets one answer (None, "pruned" or "interrupted"), in order, or an
    "exit" in its place when the driver closes. Waiting for each answer before the next epoch
    leaves the worker idle for the driver's round trip: an Optuna report and the pruner, a few
    milliseconds, and longer when the driver is busy with another trial's start or end or
    the storage is far away; a digits epoch takes 20 ms, a small net's on a GPU less. So
    while a trial's epochs take under `RUN_AHEAD_BELOW_S`, it trains on and reads the answers
    that have arrived after each epoch, waiting only when `AHEAD` epochs are unanswered: a
    pruned trial trains an epoch or so more than the pruner needed (recorded and reported
    like any other), and no epoch waits but a trial's last, which reads every answer (a prune
    that came in time stops it as pruned, not finished). Slower epochs wait for their answer,
    as an extra epoch would cost more than the wait. The answers still owed when the job ends
    are read by `settle`, before the next job."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.owed: list[list[int]] = []  # per unanswered epoch, oldest first: its trials
        self.exit = False  # an "exit" came instead of an answer: the driver sends no more

    def __call__(
        self, metrics: dict[int, dict[str, float]], epoch: int, last: set[int]
    ) -> dict[int, str | None]:
        if self.exit:
            return dict.fromkeys(metrics, "interrupted")
        for number, m in metrics.items():
            self.channel.send(("epoch", number, epoch, m))
        self.owed.append(list(metrics))
        slow = any(m.get("epoch_seconds", 0.0) >= RUN_AHEAD_BELOW_S for m in metrics.values())
        answers: dict[int, str | None] = {}
        # A trial's last epoch waits for every answer: a prune that came in time for any of its
        # epochs stops it as pruned, not as finished.
        wait = slow or bool(last)
        while self.owed and (wait or len(self.owed) > AHEAD or self.channel.poll()):
            for number, answer in self._read_one().items():
                answers[number] = answers.get(number) or answer
        return {n: answers.get(n) for n in metrics}

    def _read_one(self) -> dict[int, str | None]:
        """The answers to the oldest unanswered epoch (waiting for them)."""
        answers: dict[int, str | None] = {}
        for number in self.owed.pop(0):
            reply = ("exit",) if self.exit else self.channel.recv()
            if reply[0] != "decision":  # told to exit: every trial still waiting stops here
                # (without reading on: the driver sends no more answers, and the next "exit"
                # is for the loop in `serve`)
                self.exit = True
                answers[number] = "interrupted"
            else:
                answers[number] = reply[1]
        return answers

    def settle(self) -> bool:
        """Read the answers the job's last epochs are still owed; True when an "exit" came."""
        while self.owed:
            self._read_one()
        return self.exit
