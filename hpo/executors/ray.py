"""Trials as Ray tasks, scheduled by Ray on a cluster's CPUs and GPUs (fractions allowed).

Each worker is one long-lived Ray task running the same loop as a local worker process
(`worker.serve`); its messages travel through Ray queues. Ray is an optional extra:
`pip install 'hpo[ray]'`.
"""

from __future__ import annotations

from typing import Any

from hpo.config import Spec, SpecError
from hpo.executors import Event, Lost
from hpo.executors.local import WorkerSlots
from hpo.executors.worker import serve

INSTALL = "pip install 'hpo[ray]'"


def ray_executor(
    spec: Spec, address: str, workers: int | None, gpus_per_worker: float | None
) -> RayExecutor:
    """Check the options and that Ray is installed; the cluster is joined at `start`."""
    problems = []
    try:
        import ray  # noqa: F401
    except ImportError:
        problems.append(f"--ray: Ray is not installed; install it with: {INSTALL}")
    if workers is not None and workers < 1:
        problems.append(f"--workers: must be >= 1 (got {workers})")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        problems.append(f"--gpus-per-worker: must be >= 0 (got {gpus_per_worker})")
    if problems:
        raise SpecError(problems)
    return RayExecutor(spec, address, workers or 1, gpus_per_worker or 0.0)


class _RayChannel:
    def __init__(self, slot: int, inbox: Any, outbox: Any):
        self.slot, self.inbox, self.outbox = slot, inbox, outbox

    def send(self, message: Any) -> None:
        self.outbox.put((self.slot, message))

    def recv(self) -> Any:
        return self.inbox.get()

    def poll(self) -> bool:
        return not self.inbox.empty()


def _work(spec: Spec, slot: int, inbox: Any, outbox: Any, gpus: float, cpus: int) -> None:
    device = "cuda" if gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES for the task
    serve(_RayChannel(slot, inbox, outbox), spec, device, threads=cpus)


class RayExecutor(WorkerSlots):
    """`slots` Ray tasks, each holding `gpus` GPUs (a fraction shares one) and one CPU."""

    def __init__(self, spec: Spec, address: str, slots: int, gpus: float):
        self.spec, self.address, self.gpus = spec, address, gpus
        self._init_slots(slots, spec.training.stall_timeout)
        self.description = f"{slots} Ray workers ({gpus:g} GPU each)"
        self._tasks: list[Any] = [None] * slots
        self._inboxes: list[Any] = [None] * slots
        self._outbox: Any = None
        self._remote: Any = None

    def start(self, data: Any = None) -> None:
        import ray
        from ray.util.queue import Queue

        if not ray.is_initialized():
            if self.address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                try:
                    ray.init(address=self.address, log_to_driver=False)
                except ConnectionError:
                    if self.address != "auto":
                        raise RuntimeError(f"no Ray cluster at {self.address}") from None
                    ray.init(include_dashboard=False, log_to_driver=False)  # none: a local one
        self._remote = ray.remote(_work)
        self._outbox = Queue()
        for i in range(self.slots):
            self._spawn(i)

    def ready(self) -> None:
        waiting = set(range(self.slots))
        while waiting:
            slot, message = self._outbox.get(timeout=600)
            if message[0] != "ready":
                raise RuntimeError(f"a Ray worker could not start: {message[1]}")
            self._ready[slot] = True
            waiting.discard(slot)

    def _spawn(self, i: int) -> None:
        from ray.util.queue import Queue

        self._inboxes[i] = Queue()
        self._ready[i] = False
        self._tasks[i] = self._remote.options(num_cpus=1, num_gpus=self.gpus).remote(
            self.spec, i, self._inboxes[i], self._outbox, self.gpus, 1
        )

    def _send(self, i: int, message: tuple) -> None:
        self._inboxes[i].put(message)

    def wait(self, timeout: float) -> list[Event]:
        import ray
        from ray.util.queue import Empty

        events: list[Event] = []
        try:
            messages = [self._outbox.get(timeout=timeout)]
            messages += self._outbox.get_nowait_batch(self._outbox.qsize())
        except Empty:
            messages = []
        for slot, message in messages:
            event = self._receive(slot, message)
            if event is not None:
                events.append(event)
        finished, _ = ray.wait([t for t in self._tasks if t is not None], timeout=0)
        for ref in finished:  # a worker task ended without being told to: it died
            i = self._tasks.index(ref)
            try:
                ray.get(ref)
                why = "ended"
            except Exception as e:  # noqa: BLE001 - Ray's own errors for a lost task or node
                why = type(e).__name__
            for number in sorted(self._job[i]):
                events.append(Lost(number, f"Ray worker {i} died ({why})"))
            self._forget(i)
            self._spawn(i)
        for i, why in self._stalled():  # its task is cancelled and replaced: never heard again
            ray.cancel(self._tasks[i], force=True)
            events += [Lost(number, why) for number in sorted(self._job[i])]
            self._forget(i)
            self._spawn(i)
        self._submit_pending()
        return events

    def close(self, interrupt: bool = False) -> None:
        import ray

        tasks = [t for t in self._tasks if t is not None]
        if not tasks:
            return
        for i, task in enumerate(self._tasks):
            if task is None:
                continue
            if interrupt:
                ray.cancel(task, force=True)
            else:
                self._inboxes[i].put(("exit",))
        try:
            ray.wait(tasks, num_returns=len(tasks), timeout=60)
        except Exception:  # noqa: BLE001 - cancelled tasks raise when waited on
            pass
        self._tasks = [None] * self.slots
