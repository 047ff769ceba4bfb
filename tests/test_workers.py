"""Many trials at once: worker processes, several `hpo run` processes on one study, a real
PostgreSQL server and a real `mlflow server`, kill -9, Ctrl-C, --timeout and Ray."""

from __future__ import annotations

import json
import os
import re
import sys

import optuna
import pytest
from conftest import (
    PG_PASSWORD,
    hpo_process,
    kill_a_worker_training,
    small_spec,
    study_run,
    write_spec,
)
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import parse_spec
from hpo.outcomes import FINISHED, count_finished, state_counts, was_interrupted

runner = CliRunner()
# The tests on the session's `mlflow server` and the module's shared study run in one test
# process (`make test` runs pytest-xdist with --dist loadgroup): each process would otherwise
# start its own server and train the 16 trials of `shared` again (110 s each on 2 cores).
ON_THE_SERVER = pytest.mark.xdist_group("mlflow_server")
LONG = {"max_epochs": 300, "early_stopping": {"patience": 300}}  # trials of seconds
# A user and password in a tracking server's URL are sent as HTTP basic auth (the session's
# server takes any): like the database's, the password must appear nowhere.
TRACKING_PASSWORD = "track-Secret-51c2"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def runs_of(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def assert_exact(study, total):
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in FINISHED and not was_interrupted(t)]
    assert len(counted) == total, state_counts(trials)
    assert [t.number for t in trials] == list(range(len(trials)))  # unique, no gaps
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


# ---------------------------------------------------------------- many processes, one study


@pytest.fixture(scope="module")
def shared(postgres, mlflow_server, tmp_path_factory):
    """3 plain `hpo run` processes and a 4th with --workers 2 on one study of 16 trials; the
    4th gives the tracking server's URL with a user and password."""
    folder = tmp_path_factory.mktemp("shared")
    storage = postgres.create_database("shared16")
    spec = small_spec(name="shared", study={"n_trials": 16}, tracking={"log_model": "best"})
    path = write_spec(folder, spec)
    args = ["run", path, "--storage", storage, "--tracking-uri", mlflow_server]
    procs = [hpo_process(args, folder) for _ in range(3)]
    with_password = mlflow_server.replace("://", f"://hpo:{TRACKING_PASSWORD}@")
    args[-1] = with_password
    procs.append(hpo_process([*args, "--workers", 2], folder))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return folder, storage, mlflow_server, outputs


@ON_THE_SERVER
def test_four_processes_run_exactly_n_trials_under_one_parent_run(shared):
    folder, storage, uri, outputs = shared
    study = optuna.load_study(study_name="shared", storage=storage)
    assert_exact(study, 16)
    assert len(study.trials) == 16  # nobody was interrupted: no trial ran twice
    # Each trial is reported once, by the process that trained it. (How many of the four got a
    # trial depends on how fast each started, so that is not asserted.)
    printed = [re.findall(r"^\[ *\d+/16\] trial (\d+) ", out, re.M) for out in outputs]
    assert sorted(int(n) for nums in printed for n in nums) == list(range(16))
    assert all(t.user_attrs["worker"] for t in study.trials)

    client, parents, children = runs_of(uri, "shared")
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["hpo.trial_number"]) for c in children) == list(range(16))
    assert "RUNNING" not in {r.info.status for r in parents + children}
    by_number = {c.data.tags["hpo.trial_number"]: c for c in children}
    for t in study.trials:
        run = by_number[str(t.number)]
        assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == t.state.name
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(
            t.intermediate_values
        )
    assert parent.info.status == "FINISHED"
    test = study.user_attrs["test_metrics"]
    assert parent.data.metrics["test_accuracy"] == test["test_accuracy"] > 0.5
    models = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert [m.status.name for m in models if m.source_run_id == parent.info.run_id] == ["READY"]
    # one look at the test split: its metrics were logged to the parent run exactly once
    assert len(client.get_metric_history(parent.info.run_id, "test_accuracy")) == 1
    assert "[16/16]" in "".join(outputs)


@ON_THE_SERVER
def test_the_database_password_appears_nowhere(shared):
    folder, storage, uri, outputs = shared
    code, out = invoke("report", "shared", "--storage", storage, "--tracking-uri", uri, "--out",
                       folder / "report")  # fmt: skip
    assert code == 0, out
    texts = [*outputs, out]
    assert "postgresql://hpo:***@127.0.0.1" in outputs[0]  # shown, without its password
    study = optuna.load_study(study_name="shared", storage=storage)
    texts.append(json.dumps(study.user_attrs, default=str))
    texts += [json.dumps(t.user_attrs, default=str) for t in study.trials]
    client, parents, children = runs_of(uri, "shared")
    for run in parents + children:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".yaml", ".txt", ".json", ".md", ".html")):
                path = client.download_artifacts(run.info.run_id, artifact.path, str(folder))
                texts.append(open(path, errors="replace").read())
    for f in (folder / "report").rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("utf-8", errors="replace"))
    assert parents[0].data.tags["hpo.storage"].startswith("postgresql://hpo:***@")
    assert "mlflow http://hpo:***@127.0.0.1" in outputs[3]
    for password in (PG_PASSWORD, TRACKING_PASSWORD):
        leaks = [t[max(0, t.find(password) - 80) :][:160] for t in texts if password in t]
        assert not leaks, leaks
    # nor MLflow's own "View run ... at: URL" lines, two a trial through hpo's progress
    assert not [out for out in outputs if "View run" in out]


def test_three_processes_started_together_on_a_fresh_folder_and_database(tmp_path, postgres):
    """Tables (Optuna's and MLflow's) are created once, whoever comes first."""
    spec = small_spec(name="together", study={"n_trials": 6})
    sqlite_dir = tmp_path / "fresh"
    sqlite_dir.mkdir()
    storage = postgres.create_database("together")
    tracking = postgres.create_database("together_mlflow")  # MLflow's own migrations race too
    setups = [
        (sqlite_dir, ["run", write_spec(sqlite_dir, spec)]),
        (tmp_path, ["run", write_spec(tmp_path, spec), "--storage", storage,
                    "--tracking-uri", tracking]),
    ]  # fmt: skip
    for folder, args in setups:
        procs = [hpo_process(args, folder) for _ in range(3)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0 and "Traceback" not in out, out
            assert "locked" not in out
        url = storage if "--storage" in args else f"sqlite:///{folder / 'optuna.db'}"
        assert_exact(optuna.load_study(study_name="together", storage=url), 6)
        mlflow = tracking if "--tracking-uri" in args else f"sqlite:///{folder / 'mlflow.db'}"
        _, parents, children = runs_of(mlflow, "together")
        assert len(parents) == 1 and len(children) == 6


@ON_THE_SERVER
def test_an_experiment_created_by_another_process_meanwhile_is_used(mlflow_server):
    """A tracking server takes no lock of ours: if another process creates the experiment
    between our lookup and our create, we use theirs rather than fail (seen in CI)."""
    from hpo.tracking import MlflowTracker

    theirs = MlflowClient(mlflow_server).create_experiment("raced")
    tracker = MlflowTracker(mlflow_server, "raced")
    assert tracker._create_experiment() == theirs


def test_two_workers_on_the_default_local_storage(workdir):
    path = write_spec(workdir, small_spec(study={"n_trials": 8}))
    code, out = invoke("run", path, "--workers", 2)
    assert code == 0, out
    assert "2 worker processes on cpu" in out and "locked" not in out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert_exact(study, 8)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    _, parents, children = runs_of(f"sqlite:///{workdir / 'mlflow.db'}", "tiny")
    assert len(parents) == 1 and len(children) == 8


# ---------------------------------------------------------------- faults


@ON_THE_SERVER
def test_kill_9_of_a_worker_fails_its_trial_and_runs_it_again_once(tmp_path, postgres,
                                                                   mlflow_server):  # fmt: skip
    storage = postgres.create_database("killed")
    # 400 epochs a trial: the worker is killed at most 150 epochs into one, far from its end
    training = {"max_epochs": 400, "early_stopping": {"patience": 400}}
    path = write_spec(
        tmp_path, small_spec(name="killed", study={"n_trials": 3}, training=training)
    )
    proc = hpo_process(["run", path, "--storage", storage, "--tracking-uri", mlflow_server,
                        "--workers", 2], tmp_path)  # fmt: skip

    victim = kill_a_worker_training("killed", storage, process=proc)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "died (signal 9)" in out

    study = optuna.load_study(study_name="killed", storage=storage)
    assert_exact(study, 3)
    lost = study.trials[victim.number]
    assert lost.state == TrialState.FAIL and was_interrupted(lost) and "lost" in lost.user_attrs
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert retries[0].state == TrialState.COMPLETE and retries[0].user_attrs["kills"] == 1
    client, parents, children = runs_of(mlflow_server, "killed")
    by_number = {int(c.data.tags["hpo.trial_number"]): c for c in children}
    assert by_number[victim.number].info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in parents + children}
    # the epochs the killed worker had finished are in its trial's run, every one
    curve = client.get_metric_history(by_number[victim.number].info.run_id, "val_loss")
    assert len(curve) == len(lost.intermediate_values) >= 2


def test_timeout_stops_a_trial_at_its_next_epoch_and_a_rerun_runs_it_again(workdir):
    path = write_spec(workdir, small_spec(study={"n_trials": 1}, training=LONG))
    code, out = invoke("run", path, "--timeout", 1)
    assert code == 0, out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    cut = [t for t in study.trials if was_interrupted(t)]
    assert len(cut) == 1 and 0 < cut[0].user_attrs["epochs_run"] < 300
    assert cut[0].user_attrs["stopped_by"] == "interrupted"
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == cut[0].params
    code, out = invoke("run", path)
    assert code == 0, out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert_exact(study, 1)
    again = [t for t in study.trials if t.user_attrs.get("retry_of") == cut[0].number]
    assert len(again) == 1 and again[0].params == cut[0].params
    # run again as it ran: same seed, so the epochs it had are the same again
    assert again[0].user_attrs["seed"] == cut[0].user_attrs["seed"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    by_number = {r.data.tags.get("hpo.trial_number"): r.info.run_id for r in runs}
    curves = [
        [m.value for m in client.get_metric_history(by_number[str(t.number)], "val_loss")]
        for t in (cut[0], again[0])
    ]
    assert len(curves[0]) == cut[0].user_attrs["epochs_run"] > 0
    assert curves[1][: len(curves[0])] == pytest.approx(curves[0])


def test_ctrl_c_during_the_model_upload_is_mended_by_a_rerun(workdir, mlflow_uri, monkeypatch):
    """The upload is cut short the way Ctrl-C cuts it: after MLflow created the model entry
    (PENDING), before its files are there. The rerun marks it FAILED and logs the model."""
    import mlflow

    spec = parse_spec(small_spec(name="upload", tracking={"uri": mlflow_uri, "log_model": "best"}))
    from hpo.tracking import MlflowTracker

    real = MlflowTracker.log_model

    def cut_short(self, model, example, run_id=None):
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id or self.parent_id):
            mlflow.initialize_logged_model(name="model")  # PENDING, as an upload starts
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowTracker, "log_model", cut_short)
    with pytest.raises(KeyboardInterrupt):
        study_run(spec)
    monkeypatch.setattr(MlflowTracker, "log_model", real)
    study = optuna.load_study(study_name="upload", storage="sqlite:///optuna.db")
    assert study.user_attrs["test_metrics"] and "model_uri" not in study.user_attrs
    again = study_run(spec)
    assert again.new_trials == 0 and again.test_metrics == study.user_attrs["test_metrics"]
    study = optuna.load_study(study_name="upload", storage="sqlite:///optuna.db")
    assert study.user_attrs["model_trial"] == study.best_trial.number
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    models = [
        m
        for m in client.search_logged_models(experiment_ids=[parent.info.experiment_id])
        if m.source_run_id == parent.info.run_id
    ]
    assert sorted(m.status.name for m in models) == ["FAILED", "READY"]
    assert parent.info.status == "FINISHED"
    from hpo.tracking import load_predictor

    network = load_predictor(study.user_attrs["model_uri"], mlflow_uri).network
    assert sum(p.numel() for p in network.parameters()) == study.best_trial.user_attrs["n_params"]


# ---------------------------------------------------------------- bad options, unreachable servers


def test_bad_worker_options_are_one_line_errors(workdir, monkeypatch):
    path = write_spec(workdir, small_spec())
    for args, expected in (
        (["--workers", 0], "--workers: must be >= 1 (got 0)"),
        (["--workers-per-gpu", -1], "--workers-per-gpu: must be >= 1 (got -1)"),
        (["--workers-per-gpu", 2], "--workers-per-gpu: needs a CUDA GPU, but trials run on cpu"),
        (["--gpus-per-worker", 0.5], "--gpus-per-worker: only used with --ray"),
    ):
        code, out = invoke("run", path, *args)
        assert code == 2 and expected in out and "Traceback" not in out, (args, out)
        assert len(out.strip().splitlines()) == 1, out
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without Ray
    code, out = invoke("run", path, "--ray", "auto")
    assert code == 2 and "pip install 'hpo[ray]'" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


def test_unreachable_database_or_tracking_server_writes_nothing(workdir, postgres):
    from conftest import _free_port

    path = write_spec(workdir, small_spec())
    dead = f"postgresql://hpo:{PG_PASSWORD}@127.0.0.1:{_free_port()}/nothing"
    code, out = invoke("run", path, "--storage", dead)
    assert code == 2 and "storage: cannot open 'postgresql://hpo:***@127.0.0.1:" in out
    assert PG_PASSWORD not in out and len(out.strip().splitlines()) == 1, out
    code, out = invoke("run", path, "--tracking-uri", f"http://127.0.0.1:{_free_port()}")
    assert code == 2 and "tracking.uri: no MLflow server answers at http://127.0.0.1:" in out
    code, out = invoke("run", path, "--tracking-uri", "nosuch://x")
    assert code == 2 and "tracking.uri: unknown kind of MLflow store 'nosuch://x'" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


# ---------------------------------------------------------------- Ray


def test_ray_runs_a_study_with_two_workers(workdir):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = write_spec(workdir, small_spec(study={"n_trials": 4}))
        code, out = invoke("run", path, "--ray", "auto", "--workers", 2)
    finally:
        ray.shutdown()
    assert code == 0, out
    assert "2 Ray workers" in out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert_exact(study, 4)
    pids = {t.user_attrs["worker"] for t in study.trials}
    assert len(pids) == 2 and str(os.getpid()) not in {p.rsplit(":", 1)[1] for p in pids}
    assert count_finished(study) == 4 and study.user_attrs["test_metrics"]["test_accuracy"] > 0.5


def test_ray_workers_train_fused_cohorts(workdir):
    """--ray with --fused-trials 2: each cohort trains in one Ray task, every member is its
    own complete trial."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = write_spec(workdir, small_spec(study={"n_trials": 4}))
        code, out = invoke("run", path, "--ray", "auto", "--workers", 2, "--fused-trials", 2)
    finally:
        ray.shutdown()
    assert code == 0, out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    cohorts = {tuple(t.user_attrs["fused_with"]) for t in trials}
    assert sorted(n for c in cohorts for n in c) == [0, 1, 2, 3] and len(cohorts) == 2
    for cohort in cohorts:  # trained together, in one Ray worker, on one structure
        assert len({trials[n].user_attrs["worker"] for n in cohort}) == 1
        assert len({trials[n].params["lr"] for n in cohort}) == 2
    workers = {t.user_attrs["worker"] for t in trials}
    assert str(os.getpid()) not in {w.rsplit(":", 1)[1] for w in workers}


# ---------------------------------------------------------------- deploy/


def test_deploy_files_start_workers_with_the_same_command(workdir, monkeypatch):
    import subprocess

    import yaml
    from conftest import REPO

    job = yaml.safe_load((REPO / "deploy" / "k8s-indexed-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["hpo", "run"] and (REPO / command[2]).is_file()
    assert {e["name"] for e in container["env"]} >= {"HPO_STORAGE", "MLFLOW_TRACKING_URI"}
    script = REPO / "deploy" / "slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "srun hpo run" in script.read_text() and "#SBATCH --array=" in script.read_text()
    # HPO_STORAGE, as both files set it, is the storage hpo run uses
    monkeypatch.setenv("HPO_STORAGE", f"sqlite:///{workdir / 'from-env.db'}")
    code, out = invoke("run", write_spec(workdir, small_spec(study={"n_trials": 1})))
    assert code == 0, out
    assert (workdir / "from-env.db").is_file() and not (workdir / "optuna.db").exists()
