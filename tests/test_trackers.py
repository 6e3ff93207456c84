"""MLflow and TensorBoard beside Sacred (trainer/loggers.py): the same scalars as metrics.jsonl,
one MLflow run and one event folder across a resume, a tracker failing without stopping training,
and a missing package refused in one line before anything starts."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.loggers import HTTP_BOUNDS, Sink, check_trackers, flatten
from trainer.tracking import Tracker, TrackingError, loggable
from utils.dist import free_port
from utils.plots import plot_runs, read_run

from .conftest import QUICKSTART, ROOT, TINY, only_run_dir, run_train, signal_after_steps

FAST = [*TINY, "evaluator=null", "trainer.init_val=false", "trainer.log_step=1"]
HAVE_MLFLOW = all(importlib.util.find_spec(m) for m in ("mlflow", "sqlalchemy", "alembic"))
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason="pip install mlflow-skinny sqlalchemy alembic")
needs_tensorboard = pytest.mark.skipif(not HAVE_TENSORBOARD, reason="pip install tensorboard")


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold, from metrics.jsonl (log_step=1: a window is a step)."""
    expected: dict[str, list] = {}
    for record in _records(run):
        prefix = "train/" if "loss" in record else "epoch/"
        for key, value in loggable(record).items():
            expected.setdefault(prefix + key, []).append((record["step"], value))
    return expected


def _mlflow_runs(save_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{save_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    return client, client.search_runs([experiment.experiment_id])


def _mlflow_history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same(actual: dict, expected: dict, rel=1e-12):
    for key, points in expected.items():
        steps = [s for s, _ in actual[key]]
        assert steps == [s for s, _ in points], key
        assert [v for _, v in actual[key]] == pytest.approx([v for _, v in points], rel=rel), key


@needs_mlflow
@needs_tensorboard
@pytest.mark.slow
def test_mlflow_and_tensorboard_hold_what_metrics_jsonl_holds(tmp_path):
    assert run_train("--config", QUICKSTART, f"save_dir={tmp_path}", "--device", "cpu", "--epochs", "2", *FAST,
                     "--mlflow", "--tensorboard") == 0
    run = only_run_dir(tmp_path, "quickstart")
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert mlrun.data.params == flatten(config) and "derived.total_steps" in mlrun.data.params
    assert mlrun.data.tags["config_name"] == "quickstart" and mlrun.data.tags["world_size"] == "1"
    expected = _expected(run)
    assert set(mlrun.data.metrics) == set(expected)
    _assert_same({k: _mlflow_history(client, mlrun.info.run_id, k) for k in expected}, expected)
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} == {"results.json", "config.yaml", "figures"}
    figures = {Path(a.path).name for a in client.list_artifacts(mlrun.info.run_id, "figures")}
    assert figures == {p.name for p in plot_runs([read_run(run)], tmp_path / "figures")} and "loss.png" in figures
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == mlrun.info.run_id
    _assert_same(_tensorboard_scalars(run), expected, rel=1e-6)  # float32 in the events
    assert not (ROOT / "mlruns").exists()


@needs_mlflow
@needs_tensorboard
@pytest.mark.slow
def test_sigterm_and_resume_continue_one_run_without_a_step_twice(tmp_path):
    argv = ["--config", str(QUICKSTART), f"save_dir={tmp_path}", "--device", "cpu", "--epochs", "3", *FAST,
            "--mlflow", "--tensorboard"]
    run, code, err = signal_after_steps(argv, tmp_path / "models" / "quickstart", 7)  # inside epoch 1
    assert run is not None and code == 128 + signal.SIGTERM, err
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu", "--mlflow", "--tensorboard") == 0
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    expected = _expected(run)
    assert [s for s, _ in expected["train/loss"]] == list(range(15))
    history = {k: _mlflow_history(client, runs[0].info.run_id, k) for k in expected}
    for key, points in history.items():
        assert len({s for s, _ in points}) == len(points), f"{key}: a step twice"
    _assert_same(history, expected)
    _assert_same(_tensorboard_scalars(run), expected, rel=1e-6)


class _Broken(Sink):
    name = "Broken"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def _log(self, values, step):
        self.calls += 1
        raise ConnectionError("server gone\nmore detail")


def test_a_failing_tracker_warns_once_and_the_others_go_on(tmp_path, warnings_of_groco):
    broken = _Broken()
    seen = []

    class Recorder(Sink):
        def _log(self, values, step):
            seen.append((step, values))

    tracker = Tracker(sinks=[broken, Recorder()])
    for step in range(3):
        tracker.log_metrics({"loss": 1.0, "step": step, "flag": True, "bad": float("nan")}, step=step, prefix="train/")
    broken.close()
    assert broken.calls == 1 and seen == [(s, {"train/loss": 1.0}) for s in range(3)]
    assert [r.getMessage() for r in warnings_of_groco.records] == [
        "Broken: logging failed, it stops for this run (training goes on; metrics.jsonl and Sacred's records stay "
        "complete): server gone"]


def test_epoch_records_go_to_the_sinks_at_the_global_step():
    seen = []

    class Recorder(Sink):
        def _log(self, values, step):
            seen.append((step, values))

    Tracker(sinks=[Recorder()]).log_metrics({"epoch": 1, "step": 10, "train_loss": 0.5}, step=2, prefix="epoch/",
                                            global_step=10)
    assert seen == [(10, {"epoch/train_loss": 0.5})]


@needs_mlflow
@pytest.mark.slow
def test_mlflow_to_a_dead_server_warns_once(tmp_path, monkeypatch, warnings_of_groco):
    """A tracking server that is not there: the sink does not start, with one warning."""
    from trainer.loggers import open_sinks

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)  # unset again after the sink's default
    sinks = open_sinks(tmp_path, {"name": "x"}, tmp_path, 1, mlflow=True, tensorboard=False)
    assert sinks == [] and len(warnings_of_groco.records) == 1
    assert warnings_of_groco.records[0].getMessage().startswith("MLflow: cannot start, the run goes on without it")


@pytest.mark.parametrize("flag,command", [("--mlflow", "pip install mlflow-skinny sqlalchemy alembic"),
                                          ("--tensorboard", "pip install tensorboard")])
def test_a_missing_package_is_one_line_before_anything_starts(tmp_path, monkeypatch, caplog, flag, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "tensorboard") else real(name, *a))
    with pytest.raises(TrackingError) as err:
        check_trackers(mlflow=flag == "--mlflow", tensorboard=flag == "--tensorboard")
    assert str(err.value) == f"{flag}: install its package: {command}"
    assert run_train("--config", QUICKSTART, f"save_dir={tmp_path}", "--device", "cpu", flag) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_trackers_are_imported_only_when_asked():
    code = ("import sys, train; from trainer.loggers import check_trackers; check_trackers(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mlflow_http_retries_are_bounded_unless_set():
    from trainer.loggers import bound_http_retries

    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
    bound_http_retries(environ)
    assert environ == {**HTTP_BOUNDS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
    assert HTTP_BOUNDS == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def test_mlflow_names_replace_what_mlflow_refuses():
    from trainer.loggers import mlflow_name

    assert mlflow_name("epoch/knn@20_online") == "epoch/knn_20_online"
    assert mlflow_name("train/info_pos_neg_dist") == "train/info_pos_neg_dist"


def test_flatten_config():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "n": "x" * 600, "t": True}) == {
        "a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "n": "x" * 500, "t": "true"}



@needs_mlflow
@needs_tensorboard
@pytest.mark.slow
def test_a_hard_kill_after_the_checkpoint_writes_no_point_twice(tmp_path):
    """Points logged after the checkpoint (step 4) and before a SIGKILL: the resumed sinks continue
    the same MLflow run and event folder, and each step is there once, the resumed run's value in
    TensorBoard (purged and written again); the epoch record at the checkpoint's step, kept in
    metrics.jsonl, is written again after TensorBoard's purge."""
    from trainer.loggers import open_sinks

    config = {"name": "quickstart", "trainer": {"epochs": 2}}
    first = open_sinks(tmp_path, config, tmp_path, 1, mlflow=True, tensorboard=True)
    for step in range(7):
        Tracker(sinks=first).log_metrics({"loss": float(step)}, step=step, prefix="train/")
        if step == 3:
            Tracker(sinks=first).log_metrics({"epoch": 0, "step": 4, "train_loss": 9.0}, step=1, prefix="epoch/",
                                             global_step=4)
    first[0].writer.flush()  # killed: nothing closed
    kept = ({"epoch": 0, "step": 4, "train_loss": 9.0},)
    second = open_sinks(tmp_path, config, tmp_path, 1, mlflow=True, tensorboard=True, resume_step=4, records=kept)
    assert len(second) == 2
    for step in range(4, 9):
        Tracker(sinks=second).log_metrics({"loss": 10.0 + step}, step=step, prefix="train/")
    for sink in second:
        sink.close()
    client, runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    loss = _mlflow_history(client, runs[0].info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(9))
    assert _mlflow_history(client, runs[0].info.run_id, "epoch/train_loss") == [(4, 9.0)]
    scalars = _tensorboard_scalars(tmp_path)
    assert scalars["train/loss"] == [(s, float(s)) for s in range(4)] + [(s, 10.0 + s) for s in range(4, 9)]
    assert scalars["epoch/train_loss"] == [(4, 9.0)]


@needs_mlflow
@pytest.mark.slow
def test_a_tracking_server_killed_mid_run_costs_one_warning(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 (MLFLOW_TRACKING_URI). A run logged to it: MLflow's client
    finds it there as metrics.jsonl holds it. Then a second run, the server killed during its
    training: the run finishes, with one warning, and metrics.jsonl is complete."""
    import os
    import urllib.request

    from mlflow.tracking import MlflowClient

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.skip("mlflow server did not start here (mlflow-skinny lacks the server's packages)")
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for name in HTTP_BOUNDS:  # the sink sets them in this process: unset again after the test
            monkeypatch.delenv(name, raising=False)
        logged = tmp_path / "logged"
        assert run_train("--config", QUICKSTART, f"save_dir={logged}", "--device", "cpu", "--epochs", "1", *FAST,
                         "--mlflow") == 0
        run = only_run_dir(logged, "quickstart")
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params == flatten(yaml.safe_load((run / "config.yaml").read_text()))
        expected = _expected(run)
        assert set(runs[0].data.metrics) == set(expected)
        _assert_same({k: _mlflow_history(client, runs[0].info.run_id, k) for k in expected}, expected)

        save_dir = tmp_path / "runs"
        # MLflow's HTTP retries as the sink bounds them (trainer/loggers.py: HTTP_BOUNDS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "train.py", "--config", str(QUICKSTART), f"save_dir={save_dir}",
                                 "--device", "cpu", "--epochs", "2", *FAST, "--mlflow"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed, deadline = False, time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            found = list((save_dir / "models" / "quickstart").glob("*/metrics.jsonl"))
            if found and sum('"loss"' in line for line in found[0].read_text().splitlines()) >= 3:
                os.killpg(server.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        err = proc.communicate(timeout=180)[1]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert killed and proc.returncode == 0, err
    assert err.count("MLflow: logging failed, it stops for this run") == 1, err
    run = only_run_dir(save_dir, "quickstart")
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(10)) and len(records) == 12
    assert (run / "results.json").is_file() and (run / "mlflow_run.json").is_file()
