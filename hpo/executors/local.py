"""Trials on this machine: one in a thread of this process, or N in worker processes."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import threading
import time
import warnings
from multiprocessing.connection import Connection, wait
from typing import Any

from hpo.config import Spec
from hpo.data import Data
from hpo.executors import Done, Epoch, Event, Lost, Started
from hpo.executors.worker import serve
from hpo.redact import warning_line
from hpo.trial import CohortJob, TrialJob


def _event(message: tuple) -> Event | None:
    if message[0] == "start":
        return Started(message[1], message[2])
    if message[0] == "epoch":
        return Epoch(message[1], message[2], message[3])
    if message[0] == "done":
        return Done(message[1], message[2])
    return None


class _QueuePair:
    """The worker's end of two queues, as a channel."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue):
        self.inbox, self.outbox = inbox, outbox

    def send(self, message: Any) -> None:
        self.outbox.put(message)

    def recv(self) -> Any:
        return self.inbox.get()

    def poll(self) -> bool:
        return not self.inbox.empty()


STALL_FACTOR = 10  # a worker silent for this many of its trial's epochs has stalled
FIRST_EPOCH = 3  # before a trial's first epoch: that many times training.stall_timeout


class WorkerSlots:
    """Bookkeeping shared by the executors: which worker is ready, which job each trains and
    which it holds next, the jobs submitted while every worker held one, and which worker
    has stalled. Subclasses `_send` a message.

    Each worker trains one job and holds the next (`hpo.executors.worker`), so it starts it
    without waiting for the driver: a job goes to a worker with nothing to train, else to one
    that holds none, else waits here (`_pending`).

    A worker owes the driver a message from the moment it is sent a trial or a decision. One
    that stays silent for `STALL_FACTOR` times its trial's median epoch, and at least
    `training.stall_timeout` seconds, has stalled: a hung GPU call, a stalled network file
    system, a stopped process. Before a trial's first epoch nothing says how long its epochs
    take (a wide net on a CPU may take minutes): the limit is then `FIRST_EPOCH` times the
    floor, or `STALL_FACTOR` times the slowest epoch seen so far if that is longer. The
    subclass kills the worker and reports its trials `Lost`, to run again."""

    slots: int

    def _init_slots(self, slots: int, stall_s: float | None = None) -> None:
        self.slots = slots
        self._ready = [False] * slots
        self._job: list[set[int]] = [set() for _ in range(slots)]  # the trials it trains
        self._next: list[TrialJob | CohortJob | None] = [None] * slots  # held, not started
        self._ran_on: dict[int, int] = {}  # the worker each trial went to: its answers' way
        self._pending: list[TrialJob | CohortJob] = []
        self._stall_s = stall_s  # None: never
        self._owed = [0.0] * slots  # since when the worker owes a message (0: it does not)
        self._epochs: list[list[float]] = [[] for _ in range(slots)]  # its trial's epochs, s
        self._slowest = 0.0  # the slowest epoch seen on any worker

    def adapt(self, spec: Spec, data: Any) -> Spec:
        return spec

    def _send(self, i: int, message: tuple) -> None:
        raise NotImplementedError

    def _worker_for(self) -> int | None:
        """A ready worker with nothing to train, else one that holds no next job."""
        ready = [i for i in range(self.slots) if self._ready[i] and self._next[i] is None]
        idle = [i for i in ready if not self._job[i]]
        return (idle or ready or [None])[0]

    def submit(self, job: TrialJob | CohortJob) -> None:
        i = self._worker_for()
        if i is None:
            self._pending.append(job)
            return
        self._ran_on |= dict.fromkeys(job.numbers, i)
        if self._job[i]:
            self._next[i] = job
        else:
            self._begin(i, job)
        self._send(i, ("run", job))

    def _begin(self, i: int, job: TrialJob | CohortJob) -> None:
        """Worker `i` trains `job` now (it was idle, or it has just started the one it held)."""
        self._job[i] = set(job.numbers)
        self._epochs[i] = []
        self._owed[i] = time.monotonic()

    def cancel(self) -> list[int]:
        """Take back every job not started (the study stops): their trial numbers. A worker
        that started one meanwhile has its epochs answered "interrupted" (`_receive`)."""
        numbers = [n for job in self._pending for n in job.numbers]
        self._pending = []
        for i, job in enumerate(self._next):
            if job is not None:
                numbers += job.numbers
                self._next[i] = None
                self._send(i, ("cancel",))
        return numbers

    def _forget(self, i: int) -> None:
        """Worker `i` is replaced: its trials are lost, and no answer goes to its successor;
        the job it held and had not started goes to the next worker ready."""
        self._job[i] = set()
        self._ran_on = {n: w for n, w in self._ran_on.items() if w != i}
        if self._next[i] is not None:
            self._pending.insert(0, self._next[i])  # type: ignore[arg-type]
            self._next[i] = None

    def _submit_pending(self) -> None:
        while self._pending and self._worker_for() is not None:
            self.submit(self._pending.pop(0))

    def decide(self, number: int, decision: str | None) -> None:
        worker = self._ran_on.get(number)
        if worker is not None:  # None: its worker died meanwhile (reported as Lost)
            if not self._owed[worker] and number in self._job[worker]:
                self._owed[worker] = time.monotonic()
            self._send(worker, ("decision", number, decision))

    def _receive(self, i: int, message: tuple) -> Event | None:
        """A message from worker `i`: its readiness noted, a held job started, a finished
        trial's place freed, the time it took to answer."""
        if message[0] == "ready":
            self._ready[i] = True
            return None
        event = _event(message)
        held = self._next[i]
        if isinstance(event, Started) and held is not None and event.number in held.numbers:
            self._next[i] = None
            self._begin(i, held)
        if event is not None and event.number not in self._job[i]:
            # From a worker replaced as stalled, whose trial has run again, or a job taken
            # back (`cancel`) that the worker had started: it stops at its first epoch.
            if isinstance(event, Epoch) and self._ran_on.get(event.number) == i:
                self._send(i, ("decision", event.number, "interrupted"))
            return None
        if isinstance(event, Epoch) and self._owed[i]:  # a cohort's first member's epoch
            took = time.monotonic() - self._owed[i]
            self._epochs[i].append(took)
            self._slowest = max(self._slowest, took)
        self._owed[i] = time.monotonic() if isinstance(event, Started | Done) else 0.0
        if isinstance(event, Done):
            self._job[i].discard(event.number)
            if not self._job[i] and self._next[i] is None:
                self._owed[i] = 0.0
        return event

    def _stalled(self) -> list[tuple[int, str]]:
        """(worker, why) for each worker with a trial that has stalled (see the class)."""
        if self._stall_s is None:
            return []
        now, out = time.monotonic(), []
        for i in range(self.slots):
            if not self._owed[i] or not (self._job[i] or self._next[i]):
                continue
            epochs = self._epochs[i]
            typical = statistics.median(epochs) if epochs else self._slowest
            floor = self._stall_s if epochs else FIRST_EPOCH * self._stall_s
            limit = max(floor, STALL_FACTOR * typical)
            silent = now - self._owed[i]
            if silent > limit:
                what = f"its epochs took {typical:.2g} s" if epochs else "before its 1st epoch"
                out.append(
                    (
                        i,
                        f"stalled: its worker was silent for {silent:.0f} s ({what}; the limit "
                        f"is {limit:.0f} s, training.stall_timeout)",
                    )
                )
        return out


class ThreadExecutor(WorkerSlots):
    """One trial at a time in a thread of this process, on the driver's own data."""

    def __init__(self, spec: Spec, device: str):
        self.spec, self.device = spec, device
        self.description = f"1 worker (this process) on {device}"
        self._init_slots(1)
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._interrupt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, data: Data) -> None:
        channel = _QueuePair(self._inbox, self._outbox)
        self._thread = threading.Thread(
            target=serve,
            args=(channel, self.spec, self.device, None, data, self._interrupt),
            name="hpo-trial",
            daemon=True,
        )
        self._thread.start()

    def ready(self) -> None:
        _expect_ready(self._outbox.get())
        self._ready[0] = True

    def _send(self, i: int, message: tuple) -> None:
        self._inbox.put(message)

    def wait(self, timeout: float) -> list[Event]:
        try:
            first = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return []
        messages = [first]
        while not self._outbox.empty():
            messages.append(self._outbox.get_nowait())
        events = [e for e in (self._receive(0, m) for m in messages) if e is not None]
        self._submit_pending()
        return events

    def close(self, interrupt: bool = False) -> None:
        if self._thread is None:
            return
        if interrupt:
            self._interrupt.set()  # the trial stops at its next step
        self._inbox.put(("exit",))
        self._thread.join()
        self._thread = None


def _expect_ready(message: tuple) -> None:
    if message[0] != "ready":
        raise RuntimeError(f"a worker could not start: {message[1]}")


def _child_of_the_driver(environ: dict[str, str]) -> None:
    """What a process the driver starts (a worker, a probe) sets first."""
    # The driver's environment as it is now, not the fork server's when it started
    # ($HPO_DATA_DIR, $CUDA_VISIBLE_DEVICES, ...).
    os.environ.clear()
    os.environ.update(environ)
    # Ctrl-C reaches the whole process group: the driver decides what happens to trials.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.showwarning = warning_line  # as in `hpo run` itself
    if sys.platform.startswith("linux"):  # die with the driver, even when it is SIGKILLed
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _process_main(
    conn: Connection, spec: Spec, device: str, threads: int, environ: dict[str, str]
) -> None:
    _child_of_the_driver(environ)
    try:
        serve(conn, spec, device, threads)
    except (EOFError, BrokenPipeError, OSError):
        pass  # the driver went away


def _context() -> Any:
    """Where the platform has it, a fork server that has imported torch and the worker's code
    once: each worker (a study's, a replaced one, the next study's from the same Python
    process) forks from it ready to train, instead of importing torch again for a second or
    more (the test suite, which starts hundreds of workers, ran in half the time). Else spawn.
    Neither forks the driver, whose threads and open connections a fork would copy."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["hpo.executors.worker", "hpo.executors.local", "torch._dynamo"])
    return ctx


class NoiseProbe:
    """One configuration trained again with more seeds, in a process of its own started as a
    worker is (`_context`): the seed noise of a training, measured without touching this
    process's random state (whose worker thread trains meanwhile) or holding up the driver's
    loop. `result()` is None until it is done, then the metric's value for each seed that
    trained to a finite one."""

    def __init__(
        self, spec: Spec, device: str, config: dict, seeds: list[int], metric: str
    ) -> None:
        ctx = _context()
        self._conn, child = ctx.Pipe(duplex=False)
        args = (child, spec, device, config, seeds, metric, dict(os.environ))
        self._proc = ctx.Process(target=_noise_main, args=args, daemon=True, name="hpo-noise")
        self._proc.start()
        child.close()

    def result(self) -> list[float] | None:
        if self._conn.poll():
            try:
                return self._conn.recv()
            except (EOFError, OSError):
                return []
        return None if self._proc.is_alive() else []

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)
        self._conn.close()


def _noise_main(
    conn: Connection, spec: Spec, device: str, config: dict, seeds: list[int], metric: str,
    environ: dict[str, str],
) -> None:  # fmt: skip
    _child_of_the_driver(environ)
    import math

    import torch

    from hpo.data import load_data
    from hpo.params import TrialConfig
    from hpo.train import flush_denormals, train
    from hpo.trial import build_model, train_config

    flush_denormals()
    data = load_data(spec, device)
    if data.train[0].device.type == "cpu":
        torch.set_num_threads(1)  # beside the study's own workers
    values = []
    trial_config = TrialConfig.of(config)
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(trial_config, data, data.train[0].device)
        result = train(model, data.train, data.val, train_config(spec, data, trial_config, seed))
        value = result.best.get(metric)
        if value is not None and math.isfinite(value):
            values.append(value)
    conn.send(values)
    conn.close()


def probe_apart(spec: Spec, device: str) -> Any:
    """`autoplan.probe` in a process of its own started as a worker is, on `device`, with its
    own copy of the data: the driver's memory and random state stay as they were whatever the
    probe does (a failed CUDA graph capture leaves a process's generator mid-capture). The
    `Probe`, or why there is none (one line)."""
    ctx = _context()
    conn, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_probe_main, args=(child, spec, device, dict(os.environ)), daemon=True,
        name="hpo-probe",
    )  # fmt: skip
    proc.start()
    child.close()
    try:
        return conn.recv()
    except EOFError:
        proc.join(5)
        return f"its process died (exit code {proc.exitcode})"
    finally:
        conn.close()
        proc.join(5)


def _probe_main(conn: Connection, spec: Spec, device: str, environ: dict[str, str]) -> None:
    _child_of_the_driver(environ)
    from hpo.data import load_data
    from hpo.executors import autoplan
    from hpo.train import flush_denormals

    flush_denormals()
    try:
        data = load_data(spec, device)
        with warnings.catch_warnings():  # a capture that fails is the workers' to report
            warnings.simplefilter("ignore")
            conn.send(autoplan.probe(spec, data))
    except Exception as e:  # noqa: BLE001 - out of memory, a CUDA error: the plain plan
        conn.send(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    conn.close()


class ProcessExecutor(WorkerSlots):
    """N worker processes (started afresh: safe with CUDA and threads; see `_context`), each
    with its own data copy.

    CPU workers split the cores between them (torch threads); GPU workers are spread over
    `devices` round robin. A worker that dies is reported as `Lost` and replaced.
    """

    def __init__(self, spec: Spec, devices: list[str], threads: int, auto: bool = False):
        self.spec, self.auto = spec, auto
        self._ctx = _context()
        self._plan(devices, threads)

    def _plan(self, devices: list[str], threads: int, why: str = "") -> None:
        self.devices, self.threads = devices, threads
        self._init_slots(len(devices), self.spec.training.stall_timeout)
        where = sorted(set(devices))
        per = f", {threads} torch thread{'s' if threads > 1 else ''} each"
        if threads > 1:
            per += " (1 for a small net)"
        cpu = all(d == "cpu" for d in devices)
        self.description = (
            f"{self.slots} worker process{'es' if self.slots > 1 else ''} on {', '.join(where)}"
            + (per if cpu else "")
            + (f" ({why})" if why else "")
        )
        self._procs: list[Any] = [None] * self.slots
        self._conns: list[Connection | None] = [None] * self.slots

    def adapt(self, spec: Spec, data: Data) -> Spec:
        """With `auto` (nothing given on a GPU): the workers per device and the cohort size
        `autoplan.choose` picks from a probe on the first device (`probe_apart`); the spec
        with that `study.fused_trials`. Call it before `start`."""
        if not self.auto:
            return spec
        import torch

        from hpo import resources
        from hpo.executors import autoplan

        where = sorted(set(self.devices))
        shape = resources.Shape.of(data)
        members = spec.training.repeats * (spec.dataset.split.folds or 1)

        def fits(workers: int, fused: int) -> bool:
            return not any(
                resources.check_fits(spec, shape, torch.device(d), workers, fused * members)
                for d in where
            )

        probe = probe_apart(spec, where[0])
        if isinstance(probe, str):
            why = f"not chosen: the probe failed ({probe}); 1 worker a device, trials alone"
            plan = autoplan.Plan(1, 1, why)
        else:
            plan = autoplan.choose(
                probe,
                searched=max(1, spec.study.n_trials - len(spec.baselines)),
                max_epochs=spec.training.max_epochs,
                cores=cpu_count(),
                devices=len(where),
                members=members,
                kind="GPU" if where[0].startswith("cuda") else "CPU",
                fits=fits,
            )
        devices, threads = plan_workers(
            spec.training.device, plan.workers_per_device * len(where), None
        )
        # a copy, not `with_values`: the spec as written (stored with the study) leaves the
        # choice to each run
        study = spec.study.model_copy(update={"fused_trials": plan.fused_trials})
        self.spec = spec.model_copy(update={"study": study})
        self._plan(devices, threads, plan.why)
        return self.spec

    def start(self, data: Data | None = None) -> None:
        for i in range(self.slots):
            self._spawn(i)

    def ready(self) -> None:
        for i in range(self.slots):
            self._await_ready(i)

    def _spawn(self, i: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_process_main,
            args=(child, self.spec, self.devices[i], self.threads, dict(os.environ)),
            name=f"hpo-worker-{i}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[i], self._conns[i], self._ready[i] = proc, parent, False

    def _await_ready(self, i: int) -> None:
        conn = self._conns[i]
        assert conn is not None
        try:
            _expect_ready(conn.recv())
        except EOFError:
            code = self._procs[i].exitcode if self._procs[i] else None
            raise RuntimeError(
                f"worker {i} died while starting (exit code {code}); its error is above"
            ) from None
        self._ready[i] = True

    def _send(self, i: int, message: tuple) -> None:
        try:
            self._conns[i].send(message)  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass  # it died: its sentinel reports it

    def wait(self, timeout: float) -> list[Event]:
        conns = {c: i for i, c in enumerate(self._conns) if c is not None}
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs) if p is not None}
        ready = wait(list(conns) + list(sentinels), timeout)
        events: list[Event] = []
        dead: set[int] = set()
        for obj in ready:
            if obj in conns:
                i = conns[obj]
                try:
                    while obj.poll():
                        event = self._receive(i, obj.recv())
                        if event is not None:
                            events.append(event)
                except (EOFError, OSError):
                    dead.add(i)
            else:
                dead.add(sentinels[obj])
        for i in dead:
            events += self._replace(i)
        for i, why in self._stalled():
            self._procs[i].kill()  # SIGKILL: a stopped or hung process too
            events += self._replace(i, f"{why}; worker process {self._procs[i].pid} killed")
        self._submit_pending()
        return events

    def _replace(self, i: int, reason: str | None = None) -> list[Event]:
        proc = self._procs[i]
        proc.join(timeout=5)
        code = proc.exitcode
        lost: list[Event] = []
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        for number in sorted(self._job[i]):
            lost.append(Lost(number, reason or f"worker process {proc.pid} died ({why})"))
        self._forget(i)
        self._conns[i].close()  # type: ignore[union-attr]
        self._spawn(i)  # ready again once its data is loaded (a "ready" message)
        return lost

    def close(self, interrupt: bool = False) -> None:
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            if interrupt:
                proc.kill()
            else:
                try:
                    self._conns[i].send(("exit",))  # type: ignore[union-attr]
                except (BrokenPipeError, OSError):
                    pass
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
            self._conns[i].close()  # type: ignore[union-attr]
            self._procs[i] = None


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def plan_workers(
    device: str, workers: int | None, workers_per_gpu: int | None
) -> tuple[list[str], int]:
    """One device per worker and torch threads per worker; bad combinations raise SpecError.

    CPU: `workers` (default 1) share the cores. GPU: workers are spread over the GPUs round
    robin, `workers_per_gpu` (default 1) at most on each.
    """
    import math

    import torch

    from hpo.config import SpecError
    from hpo.data import resolve_device

    problems = []
    if workers is not None and workers < 1:
        problems.append(f"--workers: must be >= 1 (got {workers})")
    if workers_per_gpu is not None and workers_per_gpu < 1:
        problems.append(f"--workers-per-gpu: must be >= 1 (got {workers_per_gpu})")
    if problems:
        raise SpecError(problems)
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        if workers_per_gpu is not None:
            raise SpecError(
                [f"--workers-per-gpu: needs a CUDA GPU, but trials run on {resolved.type}"]
            )
        n = workers or 1
        return [str(resolved)] * n, max(1, cpu_count() // n)
    gpus = (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if resolved.index is None
        else [str(resolved)]
    )
    per_gpu = workers_per_gpu or (math.ceil(workers / len(gpus)) if workers else 1)
    n = workers or per_gpu * len(gpus)
    if n > per_gpu * len(gpus):
        raise SpecError(
            [
                f"--workers: {n} workers at {per_gpu} per GPU need {math.ceil(n / per_gpu)} "
                f"GPUs; {len(gpus)} available ({', '.join(gpus)})"
            ]
        )
    return [gpus[i % len(gpus)] for i in range(n)], max(1, cpu_count() // n)


def local_executor(
    spec: Spec, workers: int | None = None, workers_per_gpu: int | None = None
) -> ProcessExecutor:
    """Worker processes, one too: the driver's own bookkeeping (the storage, the tracking
    store, the sampler: Python, as the training loop is) then runs beside the training, not
    between its steps; see `plan_workers`. On a GPU with neither workers nor
    `study.fused_trials` given, `ProcessExecutor.adapt` chooses both (`autoplan`)."""
    devices, threads = plan_workers(spec.training.device, workers, workers_per_gpu)
    auto = chooses_plan(spec, devices, workers, workers_per_gpu)
    return ProcessExecutor(spec, devices, threads, auto=auto)


def chooses_plan(
    spec: Spec, devices: list[str], workers: int | None, workers_per_gpu: int | None
) -> bool:
    """Whether the workers and the cohort size are chosen from a probe: on GPUs, when the
    user gives none of --workers, --workers-per-gpu and study.fused_trials (1 turns it off)."""
    given = workers is not None or workers_per_gpu is not None
    given = given or "fused_trials" in spec.study.model_fields_set
    return not given and all(d.startswith("cuda") for d in devices)
