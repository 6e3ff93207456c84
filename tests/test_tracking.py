"""Experiment tracking: a Sacred run recorded in the run folder, Neptune only when asked."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

import trainer.tracking as tracking
from trainer.preemption import Preempted
from trainer.tracking import Tracker, TrackingError, check_neptune, epoch_summary, track
from utils.config import ConfigError, load_config
from utils.files import WriteError
from utils.logging import setup_logging

from .conftest import QUICKSTART, ROOT

BOTH = {"NEPTUNE_API_TOKEN": "token", "NEPTUNE_PROJECT": "workspace/project"}


def sacred_files(run_dir):
    folder = run_dir / "sacred" / "1"
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in ("run", "config", "metrics")}


def test_tracked_run_records_config_status_and_metrics(tmp_path):
    config = load_config(QUICKSTART)

    def job(tracker):
        assert tracker.active
        tracker.log_scalar("train/loss", 2.5, 0)
        record = {"step": 5, "epoch": 1, "loss": 2.0, "lr": 0.5, "initial": True, "note": "x", "nan": math.nan}
        tracker.log_metrics(record, step=record["step"], prefix="train/")
        tracker.log_metrics({"epoch": 1, "knn@20_online": 0.9}, step=1, prefix="epoch/")
        return {"final": {"knn@20_online": 0.9}}

    assert track(job, "quickstart", config, tmp_path, seed=7) == {"final": {"knn@20_online": 0.9}}
    files = sacred_files(tmp_path)
    assert files["run"]["status"] == "COMPLETED" and files["run"]["result"] == {"final": {"knn@20_online": 0.9}}
    assert files["run"]["experiment"]["name"] == "quickstart"
    assert files["config"]["loss"] == config["loss"] and files["config"]["trainer"] == config["trainer"]
    assert files["config"]["seed"] == 7
    metrics = files["metrics"]
    assert sorted(metrics) == ["epoch/knn@20_online", "train/loss", "train/lr"]
    assert metrics["train/loss"]["steps"] == [0, 5] and metrics["train/loss"]["values"] == [2.5, 2.0]
    assert metrics["train/lr"]["values"] == [0.5] and metrics["epoch/knn@20_online"]["steps"] == [1]


def test_failed_job_is_recorded_and_raised(tmp_path, capsys):
    def job(tracker):
        tracker.log_scalar("train/loss", 1.0, 0)
        raise RuntimeError("the loss became non-finite")

    setup_logging()
    with pytest.raises(RuntimeError, match="non-finite"):
        track(job, "fails.v2", {"seed": 1}, tmp_path)
    err = capsys.readouterr().err
    assert "[rank 0] ERROR Failed after" in err and "Logging error" not in err  # in the project's log format
    files = sacred_files(tmp_path)
    assert files["run"]["status"] == "FAILED"
    assert "the loss became non-finite" in "".join(files["run"]["fail_trace"])
    assert files["metrics"]["train/loss"]["values"] == [1.0]


def test_sacred_unable_to_write_its_first_records_is_one_line(tmp_path):
    """Sacred writes its first records before the job starts (and only warns about later ones): one
    that cannot be written (here its folder's name is taken by a file; a full disk alike) is a
    WriteError naming the file. The job's own OSError stays what it was."""
    (tmp_path / "sacred").write_text("not a folder")
    with pytest.raises(WriteError, match=rf"^could not write {tmp_path}/sacred: File exists") as err:
        track(lambda tracker: None, "run", {"seed": 1}, tmp_path)
    assert "\n" not in str(err.value)

    def job(tracker):
        raise FileNotFoundError(2, "No such file or directory", "data.tar")

    with pytest.raises(FileNotFoundError) as err:
        track(job, "run", {"seed": 1}, tmp_path / "fine")
    assert not isinstance(err.value, WriteError)


def test_stop_on_request_is_recorded_interrupted_not_failed(tmp_path, capsys):
    """A run preempted by SIGTERM saved its checkpoint and is to be resumed: Sacred marks it
    INTERRUPTED with a warning, not FAILED with an error; the Preempted itself propagates."""
    def job(tracker):
        raise Preempted(signal.SIGTERM, "ckpt.pth")

    setup_logging()
    with pytest.raises(Preempted, match="stopped by SIGTERM; checkpoint: ckpt.pth") as caught:
        track(job, "stopped", {"seed": 1}, tmp_path)
    assert caught.value.signum == signal.SIGTERM
    err = capsys.readouterr().err
    assert "WARNING Aborted after" in err and "ERROR" not in err
    assert sacred_files(tmp_path)["run"]["status"] == "INTERRUPTED"


def test_tracking_leaves_the_random_state_alone(tmp_path):
    """Sacred seeds the global generators when a run starts; the job sees the state it had before."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    inside = track(lambda tracker: torch.rand(3), "rng", {"seed": 5}, tmp_path)
    assert torch.equal(inside, expected)


def test_untracked_processes_log_nowhere():
    tracker = Tracker()
    assert not tracker.active
    tracker.log_scalar("loss", 1.0, 0)
    tracker.log_metrics({"loss": 1.0}, step=0)


@pytest.mark.parametrize(
    "environ,missing,present",
    [
        ({}, ["NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT"], []),
        ({"NEPTUNE_API_TOKEN": "token"}, ["NEPTUNE_PROJECT"], ["NEPTUNE_API_TOKEN"]),
        ({"NEPTUNE_PROJECT": "workspace/project", "NEPTUNE_API_TOKEN": ""}, ["NEPTUNE_API_TOKEN"], ["NEPTUNE_PROJECT"]),
    ],
)
def test_missing_neptune_variables_are_named_before_anything_starts(tmp_path, environ, missing, present):
    with pytest.raises(TrackingError) as err:
        track(lambda tracker: None, "run", {}, tmp_path, neptune=True, environ=environ)
    message = str(err.value)
    assert message.startswith("--neptune: set ") and "in the environment" in message
    assert all(name in message for name in missing) and not any(name in message for name in present)
    assert list(tmp_path.iterdir()) == []  # no run was started
    assert isinstance(err.value, ConfigError)  # run_entry turns it into one line and exit code 2


def test_missing_neptune_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TrackingError, match=r"--neptune: install neptune and neptune-sacred: "
                                            r"pip install neptune neptune-sacred$"):
        check_neptune(BOTH)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    assert check_neptune(BOTH) == ("token", "workspace/project")


def test_neptune_run_in_debug_mode(tmp_path, monkeypatch):
    """Where neptune and neptune-sacred are installed: the whole path, without a server
    (NEPTUNE_MODE=debug sends nothing and accepts any token)."""
    pytest.importorskip("neptune_sacred")
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    result = track(lambda tracker: tracker.log_scalar("train/loss", 1.0, 0) or {"final": {}}, "run", {"seed": 1},
                   tmp_path, neptune=True, environ=BOTH)
    assert result == {"final": {}} and sacred_files(tmp_path)["run"]["status"] == "COMPLETED"


@pytest.mark.slow
def test_neptune_is_imported_only_when_asked(tmp_path):
    """A fresh interpreter: a tracked run without --neptune, and a refused --neptune, import no
    Neptune module."""
    script = f"""
import sys
from trainer.tracking import TrackingError, track
track(lambda tracker: None, "run", {{"seed": 1}}, {str(tmp_path)!r})
try:
    track(lambda tracker: None, "run", {{}}, {str(tmp_path / "refused")!r}, neptune=True, environ={{}})
except TrackingError:
    pass
print(sorted(m for m in sys.modules if m.startswith("neptune")))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "sacred" / "1" / "run.json").is_file()


def test_epoch_summary_in_human_units():
    line = epoch_summary(125.0, 1000, torch.device("cpu"))
    assert line.startswith("2 minutes and 5 seconds, 8 samples/s, host memory ")
    assert "iB" in line and "GPU" not in line
