"""Resuming after faults: the checkpoint alone continues a run, a failed resume changes nothing,
an older checkpoint never overwrites the history after it, and the log is only a log."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from trainer.checkpoint import load_checkpoint, save_checkpoint
from utils.files import WriteError

from .conftest import QUICKSTART, TINY, copy_run, only_run_dir, run_train

TWO_EPOCHS = ["--config", QUICKSTART, *TINY, "--device", "cpu", "--epochs", "2", "trainer.init_val=false",
              "evaluator=null", "trainer.save_period=1", "trainer.log_step=1"]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    """Two quickstart epochs (TINY model) with a checkpoint after each (`checkpoint-epoch0.pth`, `-epoch1.pth`)."""
    save_dir = tmp_path_factory.mktemp("two_epochs")
    assert run_train(*TWO_EPOCHS, f"save_dir={save_dir}") == 0
    return only_run_dir(save_dir, "quickstart")


@pytest.mark.slow
def test_a_torn_last_line_of_the_log_is_skipped(tmp_path, trained_run, capsys):
    """A full disk cut the last append to metrics.jsonl in half: --resume auto still continues, with a
    warning, and the log is whole again afterwards."""
    run = copy_run(trained_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9')
    assert run_train("--config", QUICKSTART, *TINY, "--device", "cpu", "--resume", "auto", "--epochs", "2",
                     f"save_dir={tmp_path}") == 0
    assert "not a metrics record, skipped" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(10))
    assert load_checkpoint(run / "latest_model.pth")["step"] == 10


@pytest.mark.parametrize("change, message", [
    ("encoder.args.width=32", "encoder does not match the model: other shapes (checkpoint for model): "
                              "encoder.conv1.weight [8, 3, 3, 3] for [32, 3, 3, 3], "),  # trained_run: width 8
    ("optimizer={type: Adam, args: {}}", "its optimiser state is SGD's, and this run's optimizer.type is Adam"),
])
@pytest.mark.slow
def test_a_failed_resume_changes_nothing(tmp_path, trained_run, capsys, change, message):
    """A resume whose config does not fit the checkpoint is one line and exit 2, and the run folder
    stays byte for byte as it was; a plain resume afterwards works."""
    run = copy_run(trained_run, tmp_path)
    before = _snapshot(run)
    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu", "--epochs", "2", change) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _snapshot(run) == before
    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu", "--epochs", "2") == 0


@pytest.mark.slow
def test_an_older_checkpoint_continues_in_a_new_folder(tmp_path, two_epoch_run, capsys):
    """Resuming epoch 0's checkpoint of a run that went on to epoch 1 leaves that run as it was and
    continues in a new folder whose config.yaml names the checkpoint; that new folder then resumes
    in place like any other."""
    run = Path(shutil.copytree(two_epoch_run, tmp_path / "models" / "quickstart" / two_epoch_run.name))
    before = _snapshot(run)
    older = run / "checkpoint-epoch0.pth"
    assert run_train("--resume", older, "--device", "cpu", "--epochs", "3", "base_learning_rate=1.0",
                     f"save_dir={tmp_path}") == 0
    assert f"{older} is not its run's newest checkpoint" in capsys.readouterr().err
    assert _snapshot(run) == before
    new = next(p for p in (tmp_path / "models" / "quickstart").iterdir() if p != run)
    config = (new / "config.yaml").read_text()
    assert f"resumed_from: {older}" in config
    steps = [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(5, 15))
    assert load_checkpoint(new / "latest_model.pth")["step"] == 15
    # the newest checkpoint of the new folder continues there, and its config keeps the record
    assert run_train("--resume", new / "latest_model.pth", "--device", "cpu", "--epochs", "4") == 0
    assert sorted(p.name for p in (tmp_path / "models" / "quickstart").iterdir()) == sorted([run.name, new.name])
    assert f"resumed_from: {older}" in (new / "config.yaml").read_text()


@pytest.mark.slow
def test_a_periodic_checkpoint_cut_by_a_kill_is_written_again(tmp_path, two_epoch_run):
    """A kill while checkpoint-epoch1.pth was being written left only its temporary file. Resuming
    latest_model.pth (epoch 1) writes checkpoint-epoch1.pth again, with the same state, and removes
    the temporary file."""
    run = Path(shutil.copytree(two_epoch_run, tmp_path / "models" / "quickstart" / two_epoch_run.name))
    (run / "checkpoint-epoch1.pth").rename(run / ".checkpoint-epoch1.pth.tmp")
    with open(run / ".checkpoint-epoch1.pth.tmp", "r+b") as f:
        f.truncate(1000)
    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu", "--epochs", "3") == 0
    assert not list(run.glob(".*.tmp"))
    rewritten, original = load_checkpoint(run / "checkpoint-epoch1.pth"), load_checkpoint(
        two_epoch_run / "checkpoint-epoch1.pth")
    assert rewritten["step"] == original["step"] == 10
    for part in ("encoder", "projection"):
        assert all((rewritten[part][k] == v).all() for k, v in original[part].items())
    assert rewritten["results"] == original["results"]


@pytest.mark.slow
def test_final_results_hold_every_evaluator_whatever_its_period(tmp_path, small_quickstart):
    """k-NN every 10 epochs, a run of 1: the k-NN still runs after the last epoch, into `final`."""
    assert run_train(*small_quickstart, *TINY, "--epochs", "1", "trainer.init_val=false",
                     "--results-json", tmp_path / "results.json") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "knn@20_online" in results["final"] and results["epochs"][0]["epoch"] == 0


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a disk that is full)")


@needs_dev_full
def test_a_full_disk_leaves_the_checkpoint_as_it_was(tmp_path):
    """A checkpoint write that hits a full disk (its temporary file is /dev/full, where every write
    fails with ENOSPC) is one WriteError naming the file; the previous checkpoint stays."""
    path = tmp_path / "latest_model.pth"
    save_checkpoint({"epoch": 0, "encoder": {}, "step": 5}, path)
    (tmp_path / ".latest_model.pth.tmp").symlink_to("/dev/full")
    with pytest.raises(WriteError, match=f"^could not write {path}: No space left on device; .* MiB free there$"):
        save_checkpoint({"epoch": 1, "encoder": {}, "step": 10}, path)
    assert load_checkpoint(path)["step"] == 5 and not (tmp_path / ".latest_model.pth.tmp").exists()


@needs_dev_full
@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_the_last_checkpoint(tmp_path, trained_run, capsys):
    """The run's last write (results.json to a folder whose temporary file is /dev/full) fails: one
    error line names the file and the checkpoint to continue from, and the exit status is 1."""
    run = copy_run(trained_run, tmp_path)
    target = tmp_path / "out" / "results.json"
    target.parent.mkdir()
    (target.parent / ".results.json.tmp").symlink_to("/dev/full")
    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu", "--epochs", "2",
                     "--results-json", target) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"could not write {target}: No space left on device; " in errors[0]
    assert errors[0].endswith(f"the last complete checkpoint: {run / 'latest_model.pth'}")
