"""The loop every worker runs, whatever carries its messages: load the data once, then trials.

Messages in: ("run", TrialJob | CohortJob), ("decision", number, None | "pruned" |
"interrupted"), ("cancel",), ("exit",); a cohort's trials each get their own "start", "epoch"
and "done" messages. Messages out: ("ready", device), ("error", message), ("start", number,
"host:pid"), ("epoch", number, epoch, metrics), ("done", number, TrialRecord).

A worker holds the next job while it trains the current one (the driver sends it as soon as
it has asked for it), and starts it the moment the current one ends: between two trials it
waits for nothing. "cancel" drops the jobs it holds and has not started (the study stops).
"""

from __future__ import annotations

import os
import socket
from collections import deque
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
    inbox = Inbox(channel)
    while (job := inbox.next_job()) is not None:
        where = f"{socket.gethostname()}:{os.getpid()}"
        for number in job.numbers:
            channel.send(("start", number, where))
        if torch.device(device).type == "cpu":
            members = spec.training.repeats * (spec.dataset.split.folds or 1)
            torch.set_num_threads(threads_for(job, data, threads, members))
        answers = _Answers(inbox)
        run(
            job.trials,
            spec,
            data,
            answers,
            lambda record: channel.send(("done", record.number, record)),
            interrupt,
        )
        if inbox.exit:
            return


class Inbox:
    """The driver's messages to a worker, filed as they come: the jobs it holds, in order, and
    the answers to the epochs of the job it trains. Answers to a job it has finished (those
    it did not wait for) are dropped when they come."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.jobs: deque[TrialJob | CohortJob] = deque()
        self.training: set[int] = set()  # the trials of the job it trains
        self.answers: dict[int, deque[str | None]] = {}
        self.exit = False  # told to exit: the driver sends nothing more

    def next_job(self) -> TrialJob | CohortJob | None:
        """The next job to train (waiting for one), or None when told to exit."""
        self.training, self.answers = set(), {}
        self.read_arrived()  # a "cancel" already in takes back the job held
        while not self.jobs and not self.exit:
            self.read()
        if self.exit:
            return None
        job = self.jobs.popleft()
        self.training = set(job.numbers)
        return job

    def read(self) -> None:
        """File the next message, waiting for it."""
        message = self.channel.recv()
        kind = message[0]
        if kind == "run":
            self.jobs.append(message[1])
        elif kind == "decision":
            if message[1] in self.training:
                self.answers.setdefault(message[1], deque()).append(message[2])
        elif kind == "cancel":
            self.jobs.clear()
        else:
            self.exit = True

    def read_arrived(self) -> None:
        """File every message that has arrived, without waiting."""
        while not self.exit and self.channel.poll():
            self.read()

    def answered(self, numbers: list[int]) -> bool:
        return all(self.answers.get(n) for n in numbers)

    def take(self, numbers: list[int]) -> dict[int, str | None]:
        return {n: self.answers[n].popleft() for n in numbers}


# A step of fewer multiply-adds than this (parameters x batch rows, every member of a cohort
# counted) trains on one CPU thread: see `threads_for`.
SMALL_STEP = 4_000_000


def threads_for(job: TrialJob | CohortJob, data: Data, threads: int, members: int = 1) -> int:
    """Torch threads for a job on a CPU: `threads`, or one for a small step. On 2 cores a
    digits net's step (well under a million multiply-adds) is no faster on two threads, and
    with the driver busy on the other core (a digits epoch takes 20 ms, its bookkeeping a few)
    the second thread waits on it: a 30-trial digits study ran 1.7x as many trials an hour on
    one thread. A wide MNIST net's step (784-512-512 at batch 256: 170 million) is 1.7x faster
    on two, and its driver is idle; so are a digits trial's five folds as one cohort (64-128-128
    at batch 64, five members: 8 million; 0.39 s on two threads against 0.47 s on one).
    `members`: each trial's repeats times folds."""
    config = job.trials[0].config
    params = resources.of_config(config, resources.Shape.of(data), on_cpu=True).params
    work = params * config.batch_size * len(job.trials) * members
    return 1 if work < SMALL_STEP else threads


# While a trial's epochs take less than this, it trains on without waiting for the driver's
# answers to its last epochs, at most `AHEAD` of them unread.
RUN_AHEAD_BELOW_S = 0.5
AHEAD = 4


class _Answers:
    """The driver's answers to a job's epochs, as `hpo.trial.run`'s `on_epoch_end`.

    Every epoch message gets one answer per trial (None, "pruned" or "interrupted"), in
    order. Waiting for each answer before the next epoch leaves the worker idle for the
    driver's round trip: an Optuna report and the pruner, a few milliseconds, and longer
    when the driver is busy with another trial's start or end or the storage is far away; a
    digits epoch takes 15 ms, a small net's on a GPU less. So while a trial's epochs take
    under `RUN_AHEAD_BELOW_S`, it trains on and reads the answers that have arrived after
    each epoch, waiting only when `AHEAD` epochs are unanswered; a trial's last epoch waits
    for none, and the next job starts at once. A pruned trial trains an epoch or so more
    than the pruner needed (recorded like any other); one the pruner stopped after it had
    ended is told as pruned by the driver, which knows what it answered. Slower epochs wait
    for their answer, as an extra epoch would cost more than the wait."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.owed: list[list[int]] = []  # per unanswered epoch, oldest first: its trials

    def __call__(self, metrics: dict[int, dict[str, float]], epoch: int) -> dict[int, str | None]:
        inbox = self.inbox
        if inbox.exit:
            return dict.fromkeys(metrics, "interrupted")
        for number, m in metrics.items():
            inbox.channel.send(("epoch", number, epoch, m))
        self.owed.append(list(metrics))
        slow = any(m.get("epoch_seconds", 0.0) >= RUN_AHEAD_BELOW_S for m in metrics.values())
        answers: dict[int, str | None] = {}
        inbox.read_arrived()
        while self.owed and not inbox.exit:
            if inbox.answered(self.owed[0]):
                for number, answer in inbox.take(self.owed.pop(0)).items():
                    answers[number] = answers.get(number) or answer
            elif slow or len(self.owed) > AHEAD:
                inbox.read()
            else:
                break
        if inbox.exit:  # every trial still training stops here
            return dict.fromkeys(metrics, "interrupted")
        return {n: answers.get(n) for n in metrics}
