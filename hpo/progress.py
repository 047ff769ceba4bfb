"""What `hpo run` shows while a study runs.

A line per finished trial, always. On a terminal, a live panel under those lines: trials done
of the total with the elapsed time, the ETA and the best so far, and one row per running trial
(several with workers or fused trials) with its epoch, its current metric and a bar. When the
output is not a terminal (CI logs, a file), only the plain lines.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hpo.config import Spec
from hpo.objectives import primary
from hpo.results import EpochProgress, Progress


def fmt_time(seconds: float | None) -> str:
    """12s, 3m04s, 1h05m; ? when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def trial_line(p: Progress, metric: str) -> str:
    """One finished trial: its place in the budget, outcome, metric, epochs, time, best, ETA."""
    t = p.trial
    v = primary(t)
    if v is None and t.user_attrs.get("curve"):  # pruned, with several objectives: its last
        v = t.user_attrs["curve"][-1]
    value = f"{v:.4f}" if v is not None else "-"
    if v is not None and (se := t.user_attrs.get("value_se")) is not None:
        value += f" ± {se:.4f}"
    epochs = t.user_attrs.get("epochs_run", "?")
    note = p.note or (t.user_attrs.get("fail_reason", "") if t.state.name == "FAIL" else "")
    state = "INTERRUPTED" if t.user_attrs.get("interrupted") else t.state.name
    best = f"best {p.best_value:.4f} (#{p.best_number})" if p.best_value is not None else "best -"
    width = len(str(p.total))
    duration = t.duration.total_seconds() if t.duration else None
    return (
        f"[{p.done:>{width}}/{p.total}] trial {t.number:<3} {state:<8} "
        f"{metric} {value:<7} {epochs:>3} epochs {fmt_time(duration):>5} | {best} | "
        f"elapsed {fmt_time(p.elapsed)}, ETA {fmt_time(p.eta)}"
        + (f" | {note[:120]}" if note else "")
    )


def start_lines(info: dict[str, Any], spec: Spec) -> list[str]:
    """The lines a study starts with: what it runs on, where it is stored, notes."""
    lines = []
    d = info["data"]
    folds = d.get("folds")
    if folds:
        each = f"~{d['n_train'] - d['n_val']:,} train / ~{d['n_val']:,} val each"
        split = f"{folds}-fold cross-validation of {d['n_train']:,} rows ({each})"
        split += f" / {d['n_test']:,} test"
    else:
        split = f"{d['n_train']} train / {d['n_val']} val / {d['n_test']} test"
    repeats = spec.training.repeats
    members = (folds or 1) * repeats
    lines.append(
        f"study {info['name']!r}: {d['dataset']} ({d['task']}), {split}, "
        f"{d['n_features']} features, {info['workers']}"
        + (f", up to {fused} trials fused a cohort" if (fused := info["fused_trials"]) > 1 else "")
        + (f", {repeats} seeds a trial" if repeats > 1 else "")
        + (f" (each trial {members} members trained as one cohort)" if members > 1 else "")
    )
    lines.append(
        f"  optuna {info['storage']} | mlflow {info['tracking_uri']} | "
        f"{info['done']} of {info['total']} trials already done"
    )
    for note in d.get("notes") or []:
        lines.append(f"  note: {note}")
    for source, w in (info.get("warm_started") or {}).items():
        skipped = sum(w["skipped"].values())
        why = "; ".join(f"{n} {reason}" for reason, n in w["skipped"].items())
        lines.append(
            f"  warm start from {source!r}: {w['added']} trials added (not counted in the "
            f"budget)" + (f", {skipped} left out: {why}" if skipped else "")
        )
    for entry in spec.baselines:
        asked = spec.baseline_config(entry.name).batch_size
        capped = spec.baseline_config(entry.name, d["n_train"]).batch_size
        if capped != asked:
            lines.append(
                f"  note: baseline {entry.name!r} trains at batch size {capped}, "
                f"the training rows ({asked} asked): one step an epoch"
            )
    n_base, total = len(spec.baselines), info["total"]
    if n_base >= total and info["done"] < total:
        lines.append(
            f"warning: the {n_base} baselines use all {total} trials; the search runs "
            f"none: raise --n-trials (to {n_base + 10} for 10 searched trials)"
        )
    return lines


REDRAW_S = 0.1


class StudyDisplay:
    """The terminal's view of one `hpo run`; use it as a context manager around the study."""

    def __init__(self, metric: str, console: Console | None = None, spec: Spec | None = None):
        self.metric, self.spec = metric, spec
        self.console = console or Console(highlight=False)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.running: dict[int, EpochProgress] = {}
        self.done, self.total = 0, 0
        self.best: tuple[float, int] | None = None
        self.eta: float | None = None
        self.eta_at = time.monotonic()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._drawn = 0.0

    def __enter__(self) -> StudyDisplay:
        if self.live:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------ what the study reports

    def on_start(self, info: dict[str, Any]) -> None:
        if self.spec is not None:
            for line in start_lines(info, self.spec):
                self.print(line)
        with self._lock:
            self.done, self.total = info["done"], info["total"]
            if info.get("best_number") is not None:  # a resumed study has a best already
                self.best = (info["best_value"], info["best_number"])
            self.started = time.monotonic()

    def on_epoch(self, e: EpochProgress) -> None:
        with self._lock:
            new = e.number not in self.running
            if e.decision is None:
                self.running[e.number] = e
            else:
                self.running.pop(e.number, None)
        # Drawn at once for a trial's first epoch (however short its epochs, each trial shows
        # up), else at most every REDRAW_S, besides Live's own refresh.
        now = time.monotonic()
        if self._live is not None and (new or now - self._drawn >= REDRAW_S):
            self._drawn = now
            self._live.refresh()

    def on_trial_end(self, p: Progress) -> None:
        with self._lock:
            self.running.pop(p.trial.number, None)
            self.done, self.total = p.done, p.total
            if p.best_value is not None and p.best_number is not None:
                self.best = (p.best_value, p.best_number)
            self.eta, self.eta_at = p.eta, time.monotonic()
        self.print(trial_line(p, self.metric))

    def print(self, line: str) -> None:
        """A line above the live panel (or just a line, off a terminal)."""
        if self.live:
            self.console.print(Text(line), soft_wrap=True)
        else:
            print(line, flush=True)

    # ------------------------------------------------------------ the live panel

    def __rich__(self) -> Group:
        with self._lock:
            running = sorted(self.running.values(), key=lambda e: e.number)
            elapsed = time.monotonic() - self.started
            eta = None if self.eta is None else max(self.eta - (time.monotonic() - self.eta_at), 0)
            best = "best -"
            if self.best is not None:
                best = f"best {self.metric} {self.best[0]:.4f} (#{self.best[1]})"
            done, total = self.done, self.total
        header = Text(
            f"{done}/{total} trials done | {best} | elapsed {fmt_time(elapsed)}, "
            f"ETA {fmt_time(eta)} | {len(running)} training"
            if total
            else "opening the study...",
            style="bold",
        )
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        for e in running:
            table.add_row(
                f"trial {e.number}",
                f"epoch {e.epoch}/{e.max_epochs}",
                ProgressBar(total=e.max_epochs, completed=e.epoch, width=30),
                f"{self.metric} {e.value:.4f}",
            )
        return Group(header, table)
