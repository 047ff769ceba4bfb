"""The `hpo` command and its subcommands. The only module that exits; it prints, and so does
its terminal display (hpo/progress.py)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from hpo.config import Spec, SpecError, folder_name, load_spec, name_problem
from hpo.distributions import Distribution
from hpo.outage import RETRY_S, ServerLost
from hpo.params import STRUCTURAL, applies
from hpo.redact import MASK, first_line, redact, redact_url, url_problem

# click's error class, wherever this typer keeps click (its own copy since 0.25, else click)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Flags shown without a type in help (typer wrote `--help <bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # shown instead of the type: nothing
    return params


def _quiet_libraries() -> None:
    """What the libraries say on their own is kept to warnings: hpo prints its own lines."""
    import logging
    import warnings

    # MLflow sets its loggers' level from this when imported (after this, lazily)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # if it was imported already
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # It logs a database error at length before raising it; hpo reports it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class _OneLineErrors(TyperGroup):
    """Bad command lines are told as everything else bad is: `error: ...` on one line of
    stderr, exit status 2, instead of typer's boxed usage message."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))

    def main(self, *args: Any, standalone_mode: bool = True, **kw: Any) -> Any:
        _quiet_libraries()
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kw)
        try:
            code = super().main(*args, standalone_mode=False, **kw)
        except _CLICK_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `hpo` alone: its help, shown
                raise SystemExit(e.exit_code) from None
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            message = " ".join(redact(e.format_message()).split()).rstrip(".")
            message = message[:1].lower() + message[1:]
            help_hint = f" ({ctx.command_path} --help)" if ctx is not None else ""
            _err(f"error: {where}{message}{help_hint}")
            raise SystemExit(e.exit_code) from None
        except typer.Abort:
            _err("aborted")
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


class _Command(TyperCommand):
    """A command whose help shows no type for a flag (typer wrote `--help <bool>`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Markdown: a paragraph's lines are joined and wrapped to the terminal, and brackets
    # (hpo[ray]) are text, not rich's markup
    rich_markup_mode="markdown",
    help="Hyperparameter studies of PyTorch MLPs, from a YAML spec, tracked in MLflow.",
)


def command() -> Any:
    return app.command(cls=_Command)


SpecArg = Annotated[
    Path, typer.Argument(help="The study's YAML spec, e.g. search_spaces/digits.yaml.")
]


def _url_option(ctx: typer.Context, param: Any, value: str | None) -> str | None:
    """A URL whose password would be misread is refused before any connection."""
    problem = url_problem(value, "")
    if problem:
        raise typer.BadParameter(problem.removeprefix(": "))
    return value


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        callback=_url_option,
        envvar="HPO_STORAGE",
        help="Optuna storage URL: sqlite:///optuna.db (the default), or a database such as "
        "PostgreSQL; $HPO_STORAGE keeps its password off the command line.",
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        callback=_url_option,
        help="MLflow tracking URI \\[default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
    ),
]


def _err(line: str) -> None:
    typer.echo(line, err=True)


def _fail_spec(e: SpecError, source: Path | str | None) -> None:
    for problem in map(redact, e.problems):
        prefix = "" if not source or problem.startswith(str(source)) else f"{source}: "
        _err(f"error: {prefix}{problem}")
    raise typer.Exit(code=2)


def _load(path: Path) -> Spec:
    try:
        return load_spec(path)
    except SpecError as e:
        _fail_spec(e, path)
        raise  # unreachable: _fail_spec exits


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _version(value: bool) -> None:
    if value:
        from hpo import __version__

        typer.echo(f"hpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print hpo's version."),
    ] = False,
) -> None:
    """Hyperparameter studies of PyTorch MLPs, from a YAML spec, tracked in MLflow."""


@command()
def schema() -> None:
    """Print the spec's JSON Schema, for editors: with `# yaml-language-server: $schema=FILE`
    atop a spec, VS Code and others check its keys, types, bounds and names as you type."""
    import json

    from hpo.config import json_schema

    typer.echo(json.dumps(json_schema(), indent=1))


@command()
def validate(spec: SpecArg) -> None:
    """Check a spec and report every problem; run nothing."""
    loaded = _load(spec)
    from hpo.preflight import check_data  # Optuna only once the YAML is sound
    from hpo.search import check_spec

    try:
        check_spec(loaded)
        checked, warnings = check_data(loaded)
    except SpecError as e:
        _fail_spec(e, spec)
    n = len([v for v in loaded.space.values() if isinstance(v, Distribution)])
    typer.echo(
        f"{spec}: ok - study {loaded.name!r} on {loaded.dataset.name}, {n} searched "
        f"hyperparameter{'s' * (n != 1)}, {loaded.study.n_trials} trials, "
        f"sampler {loaded.study.sampler.name}, "
        f"pruner {loaded.study.pruner.name}, metric {loaded.study.metric}"
        + (
            f", {len(loaded.baselines)} baseline{'s' * (len(loaded.baselines) != 1)} first"
            if loaded.baselines
            else ""
        )
        + (
            f", up to {loaded.study.fused_trials} trials fused"
            if loaded.study.fused_trials > 1
            else ""
        )
    )
    if checked:
        typer.echo(f"  {checked}")
    for warning in warnings:
        _err(f"warning: {warning}")


@command()
def names(
    kind: Annotated[str | None, typer.Argument(help="datasets, samplers, ...")] = None,
) -> None:
    """List the names a spec can use: datasets, samplers, pruners, activations, optimizers,
    inits, lr_schedules; and the hyperparameters, with their defaults and allowed values."""
    from hpo.params import PARAMS
    from hpo.registry import ALL

    kinds = [*ALL, "hyperparameters"]
    if kind is not None and kind not in kinds:
        _err(f"error: names: unknown kind {kind!r}; allowed: {', '.join(kinds)}")
        raise typer.Exit(code=2)
    for title, reg in ALL.items():
        if kind in (None, title):
            typer.echo(f"{title} ({reg.key}):")
            width = max(len(n) for n in reg)
            for e in reg.values():
                typer.echo(f"  {e.name:<{width}}  {e.doc}")
    if kind in (None, "hyperparameters"):
        typer.echo("hyperparameters (search_space.*): name, default, allowed values")
        width = max(len(n) for n in PARAMS)
        for p in PARAMS.values():
            allowed = p.allowed().replace("`", "")
            typer.echo(f"  {p.name:<{width}}  {p.shown_default:<8}  {allowed}: {p.described()}")


@command()
def run(
    spec: SpecArg,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Any key of the spec set as KEY=VALUE, the key dotted and the value YAML: "
            "training.max_epochs=5 study.sampler.name=random search_space.lr=1.0e-3. They "
            "beat the flags below for the same key. Where results go: --storage and "
            "--tracking-uri, then $HPO_STORAGE and $MLFLOW_TRACKING_URI, then the spec.",
            show_default=False,
        ),
    ] = None,
    n_trials: Annotated[
        int | None, typer.Option(help="Total trials (overrides study.n_trials).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds for this invocation (> 0).")
    ] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (overrides name:).")] = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    max_epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs a trial at most (overrides training.max_epochs): a quick look. It "
            "changes the study's spec hash: use it with a new --study-name.",
        ),
    ] = None,
    max_samples: Annotated[
        int | None,
        typer.Option(
            help="Training-pool samples kept (overrides dataset.max_samples): a quick look on "
            "a subset. It changes the study's spec hash: use it with a new --study-name.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for the sampler and the trials (0 to 2**32 - 1)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Trials at once on this machine (worker processes; CPU cores are split "
            "between them). Default: 1, or one per GPU times --workers-per-gpu; on GPUs with "
            "neither this, --workers-per-gpu nor --fused-trials given, both are chosen from a "
            "probe of the step time (the first line says what)."
        ),
    ] = None,
    workers_per_gpu: Annotated[
        int | None, typer.Option(help="Workers sharing each GPU (small trials).")
    ] = None,
    fused_trials: Annotated[
        int | None,
        typer.Option(
            help="Trials trained together as one stacked model in each worker (overrides "
            f"study.fused_trials): they share {', '.join(STRUCTURAL)}; each has its own "
            "learning rate, regularisation and seed.",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run the workers as Ray tasks: 'auto' (a running cluster, else a local one) "
            "or a cluster address. Needs: pip install 'hpo[ray]'."
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="With --ray: GPUs per worker, fractions allowed.")
    ] = None,
    warm_start: Annotated[
        list[str] | None,
        typer.Option(
            help="An earlier study in the same storage whose finished trials that fit this "
            "spec (same data, split and training; parameters inside the search space) start "
            "this one; repeat for several (adds to study.warm_start)."
        ),
    ] = None,
    retry_for: Annotated[
        float,
        typer.Option(
            min=0,
            envvar="HPO_RETRY_FOR",
            help="Seconds to wait for a database or tracking server that goes away mid-study; "
            "then the run stops, its trials interrupted (run it again to continue).",
        ),
    ] = RETRY_S,
) -> None:
    """Run a study (or continue or join it: same name, same storage) and print a summary.

    Several `hpo run` processes, on one machine or many, can share one study: give them the
    same --storage (PostgreSQL across machines) and --tracking-uri (an MLflow server).
    """
    if study_name is not None and (problem := name_problem(study_name, "--study-name")):
        _err(f"error: {problem}")
        raise typer.Exit(code=2)
    if seed is not None and not 0 <= seed < 2**32:
        _err(f"error: --seed: must be from 0 to 4294967295 (got {seed})")
        raise typer.Exit(code=2)
    loaded = _load(spec)
    flags = {"n_trials": n_trials, "timeout": timeout, "fused_trials": fused_trials,
             "device": device, "max_epochs": max_epochs, "max_samples": max_samples}  # fmt: skip
    from hpo import api

    given = _overrides(overrides or [])
    values = {api.SHORTHANDS[k]: v for k, v in flags.items() if v is not None}
    if values or given:
        try:
            loaded = loaded.with_values(values | given)
        except SpecError as e:  # told by the option that set the value
            problems = e.problems
            for path in set(values) - set(given):
                at, flag = f"{path}:", f"--{path.split('.')[1].replace('_', '-')}:"
                problems = [flag + p[len(at) :] if p.startswith(at) else p for p in problems]
            problems = [p if p.startswith("--") else f"command line: {p}" for p in problems]
            _fail_spec(SpecError(problems), None)

    import optuna

    from hpo.progress import StudyDisplay

    # Our own line per trial replaces Optuna's log (which prints a traceback per failed trial).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    display = StudyDisplay(loaded.study.metric, spec=loaded)

    try:
        # A scheduler's SIGTERM is handled like Ctrl-C; neither cuts a storage write in two
        # (`hpo.run` sees to it).
        with display:
            result = api.run(
                loaded,
                study_name=study_name,
                storage=storage,
                tracking_uri=tracking_uri,
                seed=seed,
                workers=workers,
                workers_per_gpu=workers_per_gpu,
                ray=ray,
                gpus_per_worker=gpus_per_worker,
                warm_start=warm_start or [],
                retry_for=retry_for,
                on_start=display.on_start,
                on_trial_end=display.on_trial_end,
                on_epoch=display.on_epoch,
                on_notice=lambda line: _err(f"warning: {line}"),
            ).summary
    except SpecError as e:
        _fail_spec(e, e.source or spec)
    except ServerLost as e:
        _err(
            f"error: {e}; {e.then}run the same command again to continue the study (the trials "
            "it was training run again)"
        )
        raise typer.Exit(code=1) from None
    except RuntimeError as e:  # a worker that cannot start, a storage gone mid-study
        _err(f"error: {redact(str(e))}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        _err("interrupted before the study finished; run the same command again to continue")
        raise typer.Exit(code=130) from None
    assert result is not None

    _summary(result)
    if result.interrupted:
        _err(
            f"interrupted: {sum(result.counts[k] for k in ('COMPLETE', 'PRUNED', 'FAIL'))} of "
            f"{loaded.study.n_trials} trials finished; run the same command again to continue"
        )
        raise typer.Exit(code=130)


def _overrides(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE arguments as dotted paths and values read as the spec's YAML is."""
    from hpo.config import read_yaml

    values: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            problems.append(
                f"{item!r}: an override is KEY=VALUE with a dotted key, such as "
                "training.max_epochs=5 or search_space.lr=1.0e-3"
            )
            continue
        try:
            values[key] = read_yaml(text) if text.strip() else None
        except Exception as e:  # noqa: BLE001 - yaml's errors, told in one line
            problems.append(f"{key}: the value {text!r} is not YAML: {first_line(str(e))}")
    if problems:
        _fail_spec(SpecError(problems), "command line")
    return values


def _interrupted(counts: dict[str, int]) -> str:
    n = counts.get("INTERRUPTED", 0)
    return f", {n} interrupted (not counted)" if n else ""


def _applying(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration without the settings that change nothing in it (`hpo.params.applies`;
    `widths` says the layers' sizes, so `width` goes, and a linear model has no `widths`)."""
    linear = config.get("n_layers") == 0
    return {
        k: v
        for k, v in config.items()
        if applies(k, config) and k != "width" and not (linear and k == "widths")
    }


def _warm(counts: dict[str, int]) -> str:
    n = counts.get("WARM", 0)
    return f" ({n} warm-started, not in the budget)" if n else ""


def _numbers(numbers: list[int], most: int = 6) -> str:
    """' (#0, #3)': which trials, when there are few enough to name; '' otherwise."""
    if not numbers or len(numbers) > most:
        return ""
    return " (" + ", ".join(f"#{n}" for n in numbers) + ")"


def _summary(r: Any) -> None:
    from hpo.progress import fmt_time

    c = r.counts
    typer.echo("")
    typer.echo(
        f"study {r.study_name!r}: {c['COMPLETE']} complete{_warm(c)}, {c['PRUNED']} pruned, "
        f"{c['FAIL']} failed{_interrupted(c)} ({r.new_trials} run now in "
        f"{fmt_time(r.wall_time)}, device {r.device})"
    )
    if r.stopped_because:
        typer.echo(f"stopped before the budget: {r.stopped_because}")
    if noise := r.seed_noise:
        values = ", ".join(f"{v:.4f}" for v in noise["values"])
        typer.echo(
            f"seed noise: {r.metric} deviates by {noise['sd']:.4f} between seeds (trial "
            f"#{noise['trial']} trained with {len(noise['values'])} seeds: {values})"
        )
    if dropped := (r.data_info or {}).get("test_dropped"):
        typer.echo(
            f"note: the test metrics leave out {dropped:,} rows of the test file whose labels "
            "the training file lacks (dataset.test_unseen_labels: drop)"
        )
    if any(r.fit_counts.values()):
        fits = ", ".join(
            f"{n} {label}{_numbers(r.fit_trials.get(label, []))}"
            for label, n in r.fit_counts.items()
        )
        typer.echo(f"fit diagnosis: {fits} (trial user attribute 'fit', MLflow tag hpo.fit)")
    if r.front is not None:
        for line in front_lines(r.front):
            typer.echo(line)
    if r.best_number is None:
        none = "no feasible trial completed" if r.front and r.front["complete"] else (
            "no trial completed")  # fmt: skip
        typer.echo(f"{none}, so there is no best model and no test evaluation")
    else:
        se = f" ± {r.best_se:.4f} (standard error)" if r.best_se is not None else ""
        which = f"best trial #{r.best_number}"
        if r.front is not None:
            which = f"the study's model, {r.front['rule']}: trial #{r.best_number}"
        typer.echo(f"{which}: {r.metric} = {r.best_value:.4f}{se}")
        shown = _applying(r.best_params)
        typer.echo("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        if r.test_metrics:
            test = ", ".join(f"{k} = {v:.4f}" for k, v in r.test_metrics.items())
            how = f", {r.test_model}" if r.test_model else ""
            typer.echo(f"test split (used once, by trial #{r.best_number}{how}): {test}")
        elif r.test_note:
            typer.echo(f"test split: not yet used ({r.test_note})")
        if r.champion:
            typer.echo(
                f"best model: {r.champion} in MLflow's model registry ({r.model_uri}; or: "
                f"mlflow models serve -m {r.champion})"
            )
        elif r.model_uri:
            typer.echo(f"best model: {r.model_uri}   (or: mlflow models serve -m {r.model_uri})")
        if e := r.ensemble:
            typer.echo(ensemble_line(e, r.metric, r.test_metrics))
    if r.baselines is not None:
        for line in r.baselines.sentences():
            typer.echo(line)
    _next_steps(r)


def front_lines(front: dict[str, Any], most: int = 10) -> list[str]:
    """The Pareto front of a study of several objectives (or with constraints), the
    infeasible trials, and how the study's model was chosen."""
    from hpo.objectives import show as show_quantity

    arrows = {"maximize": "higher is better", "minimize": "lower is better"}
    names = ", ".join(f"{n} ({arrows[d]})" for n, d in front["objectives"])
    rows = front["front"]
    head = "Pareto front" if len(front["objectives"]) > 1 else "best feasible trials"
    lines = [f"{head} of {names}: {len(rows)} of {front['complete']} complete trials"]
    for row in rows[:most]:
        values = ", ".join(f"{n} {show_quantity(v)}" for n, v in row["values"].items())
        mark = "   <- the study's model" if row["number"] == front["chosen"] else ""
        lines.append(f"  #{row['number']}: {values}{mark}")
    if len(rows) > most:
        lines.append(f"  ... and {len(rows) - most} more (hpo report)")
    if bad := front["infeasible"]:
        shown = "; ".join(f"#{n} {', '.join(why)}" for n, why in list(bad.items())[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        lines.append(f"infeasible (study.constraints): {len(bad)} complete: {shown}{more}")
    return lines


def ensemble_line(e: dict[str, Any], metric: str, best_test: dict[str, float]) -> str:
    """The ensemble in one line: its members and weights, validation and test, the model."""
    members = ", ".join(f"#{n} x{w:.2g}" for n, w in e["members"].items())
    test_key = "test_" + metric.removeprefix("val_")
    single = f" (best trial: {best_test[test_key]:.4f})" if test_key in best_test else ""
    return (
        f"ensemble of {len(e['members'])} trials ({members}; {e['size']} rounds of greedy "
        f"selection from the best {len(e['candidates'])}): {metric} = {e[metric]:.4f}, "
        f"{test_key} = {e[test_key]:.4f}{single}; model {e['model_uri']}"
    )


def _hpo() -> str:
    """How to run hpo again as this process was run: `hpo` when that is on the PATH, else its
    path (`.venv/bin/hpo` after `make run`), else `python -m hpo`."""
    import shutil
    import sys

    argv0 = sys.argv[0]
    found = shutil.which("hpo")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "hpo"
    if os.path.basename(argv0) == "hpo" and os.path.isfile(argv0):
        return _shortest(argv0)
    return f"{_shortest(sys.executable or 'python3')} -m hpo"


def _shortest(path: str) -> str:
    """A program's path as typed from this folder: relative when shorter, ./ where needed."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    if os.sep not in relative:
        relative = f".{os.sep}{relative}"  # else the shell looks it up on the PATH
    return relative if len(relative) < len(path) else path


def _next_steps(r: Any) -> None:
    """Commands that run as printed, from this folder, for what a user does next."""
    import shlex

    from hpo.storage import DEFAULT_STORAGE
    from hpo.tracking import resolve_uri

    hpo, name = _hpo(), r.study_name
    where = ""
    if r.storage != DEFAULT_STORAGE:  # a password, shown as ***, comes from the environment
        url = '"$HPO_STORAGE"' if MASK in r.storage else shlex.quote(r.storage)
        where = f" --storage {url}"
    steps = [(f"{hpo} report {name}{where}", f"the study's report: reports/{name}/index.html")]
    if r.tracking_uri.startswith(("http://", "https://")):
        steps.append((f"open {r.tracking_uri}", "the runs, on the MLflow server"))
    else:
        tracking = ""
        if r.tracking_uri != resolve_uri(None, None):  # hpo ui would open another store
            tracking = f" --tracking-uri {shlex.quote(r.tracking_uri)}"
        steps.append((f"{hpo} ui {name}{tracking}", "the runs in the MLflow UI"))
    if r.model_uri:
        row = (r.data_info or {}).get("row")
        steps.append(
            (
                f"{hpo} predict {name} ROWS.csv{where}",
                "the best model on new rows" + (f"; a row: {row}" if row else ""),
            )
        )
    width = max(len(command) for command, _ in steps)
    typer.echo("next steps:")
    for command, what in steps:
        typer.echo(f"  {command:<{width}}   {what}")


def _open_storage(url: str) -> Any:
    """The Optuna storage at `url` (None for a SQLite file that does not exist), or exit 2."""
    from hpo.storage import missing_sqlite, open_storage

    if missing_sqlite(url):
        return None

    try:
        return open_storage(url)
    except SpecError as e:
        _fail_spec(e, None)


def _load_studies(names: list[str], storage: str | None) -> list[Any]:
    """The named studies, or exit 2 naming each one that is not there."""
    import optuna

    from hpo.storage import DEFAULT_STORAGE

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = storage or DEFAULT_STORAGE
    opened = _open_storage(url)
    loaded = []
    for name in names:
        try:
            if opened is None:
                raise KeyError(name)
            loaded.append(optuna.load_study(study_name=name, storage=opened))
        except KeyError:
            shown = redact_url(url)
            _err(
                f"error: no study {name!r} in {shown}; `hpo studies --storage {shown}` lists "
                "the studies there"
            )
    if len(loaded) < len(names):
        raise typer.Exit(code=2)
    return loaded


@command()
def studies(storage: StorageOpt = None) -> None:
    """List the studies in a storage: trials by state, best value, test metric."""
    from hpo.storage import DEFAULT_STORAGE
    from hpo.study import list_studies

    url = storage or DEFAULT_STORAGE
    opened = _open_storage(url)
    if opened is None:
        typer.echo(f"no studies in {redact_url(url)} (no such file)")
        return
    rows = list_studies(opened)
    if not rows:
        typer.echo(f"no studies in {redact_url(url)}")
        return
    header = ["study", "complete", "pruned", "failed", "interrupted", "metric", "best", "test"]
    table = [header] + [
        [
            r["name"],
            str(r["COMPLETE"]),
            str(r["PRUNED"]),
            str(r["FAIL"]),
            str(r["INTERRUPTED"]),
            r["metric"],
            _fmt(r["best"]) if r["best"] is not None else "-",
            r["test"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@command()
def report(
    study: Annotated[str, typer.Argument(help="The study's name.")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder \\[default: reports/STUDY].")] = None,
) -> None:
    """Write a study report: index.html (opens offline), report.md with PNG figures."""
    from hpo.reports import write_report

    (loaded,) = _load_studies([study], storage)
    _check_out(out or Path("reports"))
    folder = write_report(loaded, out, tracking_uri)
    typer.echo(f"report for {study!r}: {folder / 'index.html'} and {folder / 'report.md'}")


@command()
def predict(
    study: Annotated[str, typer.Argument(help="The study's name.")],
    data: Annotated[
        Path,
        typer.Argument(
            help="Raw rows: a CSV (or .parquet) with the data file's feature columns (a target "
            "column is used to score the predictions), or for an image study one row of raw "
            "pixel values per image (with a header, a `label` or `target` column scores them)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write the predictions here (CSV) \\[default: stdout].")
    ] = None,
    probabilities: Annotated[
        bool, typer.Option(help="Add each class's probability (classification).")
    ] = False,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Predict with a study's best model, logged in MLflow: raw rows in, labels out."""
    import pandas as pd

    from hpo.api import Result
    from hpo.serving import read_rows

    (loaded,) = _load_studies([study], storage)
    try:
        predictor = Result.of(loaded, tracking_uri).best_model()
    except LookupError as e:  # none logged
        _err(f"error: {e.args[0]}")
        raise typer.Exit(code=2) from None
    except Exception as e:  # noqa: BLE001 - a store that moved, an older model: one line
        uri = loaded.user_attrs["model_uri"]
        _err(f"error: cannot load the model {uri} of study {study!r}: {first_line(e, 200)}")
        raise typer.Exit(code=2) from None
    if not data.is_file():
        _err(f"error: {data}: no such file")
        raise typer.Exit(code=2)
    try:
        frame = read_rows(data, predictor.prep)
    except Exception as e:  # noqa: BLE001 - a file that is not a table: the user's to fix
        _err(f"error: {data}: cannot read it as a table ({first_line(e, 200)})")
        raise typer.Exit(code=2) from None
    target = predictor.prep.get("target")
    if predictor.prep["kind"] != "table":  # image rows: a `label` or `target` column, if any
        named = [c for c in frame.columns if str(c).strip().lower() in ("label", "target")]
        target = named[0] if named else None
    truth = frame.pop(target) if target and target in frame.columns else None
    try:
        predicted = predictor.predict(frame, probabilities)
    except ValueError as e:
        _err(f"error: {data}: {e}")
        raise typer.Exit(code=2) from None
    if isinstance(predicted, pd.DataFrame):
        table = predicted
    else:
        table = pd.DataFrame({"prediction": predicted})
    if out is None:
        typer.echo(table.to_csv(index=False), nl=False)
    else:
        table.to_csv(out, index=False)
        typer.echo(f"wrote {len(table)} predictions to {out}")
    if truth is not None:
        labels = table["prediction"]
        if predictor.prep["task"] == "classification":
            classes = [str(c) for c in predictor.prep["classes"]]
            if not {str(t) for t in truth} <= set(classes):  # class numbers, not their names
                truth = truth.map(lambda t: classes[int(t)] if str(t).isdigit()
                                  and int(t) < len(classes) else t)  # fmt: skip
            hits = sum(str(a) == str(b) for a, b in zip(labels, truth, strict=True))
            score = f"accuracy {hits / max(len(truth), 1):.4f} ({hits} of {len(truth)})"
        else:
            errors = labels.to_numpy(dtype=float) - truth.to_numpy(dtype=float)
            score = f"rmse {float((errors**2).mean() ** 0.5):.6g}"
        _err(f"against the {target!r} column of {data}: {score}")


def _check_out(folder: Path) -> None:
    """Exit 2 with one line when the report folder cannot be written."""
    from hpo.storage import check_writable

    try:
        check_writable(folder, "the report", "--out", "give --out a writable folder")
    except SpecError as e:
        _fail_spec(e, None)


@command()
def compare(
    studies: Annotated[list[str], typer.Argument(help="Two or more study names.")],
    storage: StorageOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder \\[default: reports/compare-A-B].")
    ] = None,
    reseed: Annotated[
        int, typer.Option(min=0, help="Retrain each best configuration K times with new seeds.")
    ] = 0,
) -> None:
    """Compare studies side by side; with --reseed K, weigh the difference against seed noise."""
    from hpo.reports.compare import write_compare

    if len(studies) < 2:
        _err("error: compare needs at least two study names")
        raise typer.Exit(code=2)
    loaded = _load_studies(studies, storage)
    folder = out or Path("reports") / folder_name("compare-" + "-".join(studies))
    _check_out(folder)
    try:
        write_compare(loaded, folder, reseed)
    except SpecError as e:
        _fail_spec(e, None)
    typer.echo(f"comparison: {folder / 'index.html'} and {folder / 'report.md'}")
    typer.echo((folder / "report.md").read_text().strip().splitlines()[-1])


@command()
def ui(
    study: Annotated[
        str | None,
        typer.Argument(
            help="The study (or MLflow experiment) to show \\[default: the study started last]."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Open the MLflow UI on the same tracking store, bound to 127.0.0.1, and print the URL of
    a study's runs (trials nested under the study's run; then its trials, best first)."""
    from hpo.servers import ServerError, check_port, mlflow_ui_command, mlflow_views, serve
    from hpo.tracking import resolve_uri

    try:
        uri = resolve_uri(None, tracking_uri)
    except SpecError as e:
        _fail_spec(e, None)
    if uri.lower().startswith(("http://", "https://")):
        _err(
            f"error: --tracking-uri: {redact_url(uri)} is an MLflow server: open it in a "
            "browser; hpo ui serves a store (sqlite:///mlflow.db, a database)"
        )
        raise typer.Exit(code=2)
    base = f"http://127.0.0.1:{port}"
    try:
        check_port(port)
        views = mlflow_views(uri, study, base)
    except ServerError as e:
        _err(f"error: {redact(str(e))}")
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:  # Ctrl-C while the study is looked up: nothing started yet
        raise typer.Exit(code=130) from None
    typer.echo(f"MLflow UI for {redact_url(uri)}: starting at {base} (Ctrl-C to stop)")

    def where_to_look() -> None:  # once it answers: a link opened then shows the page
        typer.echo(f"MLflow UI at {base}")
        for what, url in views:
            typer.echo(f"  {what}: {url}")
        if not views:
            typer.echo(f"  no hpo study in {redact_url(uri)} yet")

    with tempfile.TemporaryFile() as log:
        code = serve(*mlflow_ui_command(uri, port), ready=(f"{base}/health", where_to_look),
                     output=log)  # fmt: skip
        _server_failed(code, log, "MLflow UI")
    raise typer.Exit(code=code)


@command()
def dashboard(
    storage: StorageOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Open Optuna's dashboard (optuna-dashboard) on a study storage, bound to 127.0.0.1."""
    from hpo.servers import ServerError, check_port, dashboard_command, serve
    from hpo.storage import DEFAULT_STORAGE, missing_sqlite

    url = storage or DEFAULT_STORAGE
    if missing_sqlite(url):
        _err(
            f"error: --storage: no such file: {redact_url(url)}; give the storage `hpo run` used "
            "(--storage, $HPO_STORAGE, or run from the folder that has optuna.db)"
        )
        raise typer.Exit(code=2)
    _open_storage(url)  # one line and exit 2 for a URL that cannot be opened
    try:
        check_port(port)
    except ServerError as e:
        _err(f"error: {e}")
        raise typer.Exit(code=2) from None
    shown = f"http://127.0.0.1:{port}/dashboard"
    typer.echo(f"Optuna dashboard for {redact_url(url)} at {shown} (Ctrl-C to stop)")
    with tempfile.TemporaryFile() as log:
        code = serve(*dashboard_command(url, port), output=log)
        _server_failed(code, log, "Optuna dashboard")
    raise typer.Exit(code=code)


def _server_failed(code: int, log: Any, what: str) -> None:
    """The server's own lines (its logs, its libraries' warnings and advice) are kept off the
    terminal; when it fails, its last ones are shown, redacted, to say why."""
    if code == 0:
        return
    log.seek(max(log.seek(0, os.SEEK_END) - 65536, 0))  # the end of a log of any length
    text = log.read().decode("utf-8", errors="replace")
    last = [line.rstrip() for line in text.splitlines() if line.strip()][-15:]
    _err(f"error: the {what} stopped with exit status {code}; its last lines:")
    for line in last:
        _err(f"  {redact(line)}")


def main() -> None:
    """Console entry point."""
    import warnings

    from hpo.redact import warning_line

    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # mlflow probes for git otherwise
    warnings.showwarning = warning_line  # a library's warnings in one line, not source lines
    app()
