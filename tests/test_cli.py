"""The command line's contract: bad values and contradictory flags stop a run in one line with exit
status 2 before anything is written, `eval.py --resume auto` needs a checkpoint, a stopped run
exits 128 + the signal number, and a process whose peers never come says so and gives up."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from data_loader.base import LoaderRuntime
from trainer.build import build_loader, steps_per_epoch
from trainer.checkpoint import load_checkpoint
from utils.config import ConfigError, load_config
from utils.dist import free_port
from utils.schema import validate

from .conftest import QUICKSTART, ROOT, TINY, only_run_dir, run_eval, run_train

FAST = ["evaluator=null", "trainer.init_val=false"]


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "ERROR" in line]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epochs", "-3"], "trainer.epochs: -3 (also set by --epochs); training needs at least 1 epoch"),
        (["trainer.epochs=0"], "trainer.epochs: 0"),
        (["warmup_epochs=-5"], "warmup_epochs: -5; warm-up lasts 0 epochs or more"),
        (["--epochs", "2", "warmup_epochs=2.5"], "warmup_epochs: 2.5 is more than the 2 epoch(s) of trainer.epochs "
                                                "(also set by --epochs); the warm-up ends within the run"),
        (["base_learning_rate=-4"], "base_learning_rate: -4; a learning rate must be positive"),
        (["base_learning_rate=0"], "base_learning_rate: 0; a learning rate must be positive"),
        (["train_dataloader.args.batch_size=0"], "train_dataloader.args.batch_size: 0; a batch holds at least one"),
        (["valid_dataloader.1.args.batch_size=-2"], "valid_dataloader.1.args.batch_size: -2; a batch holds"),
        (["--epochs", "1", "train_dataloader.args.batch_size=4096"],
         "train_dataloader.args.batch_size: 4096 (the global batch; 1 process) is more than the 1297 training "
         "samples: an epoch would have no step"),
    ],
)
def test_bad_values_fail_in_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    """Values that type-check but make no run (total steps -15, warm-up steps -25, a raw ValueError
    from SGD, a batch larger than the data accepted with `steps_per_epoch: 0`): exit status 2, one
    line naming the key, no run folder, in a dry run too."""
    for dry in ([], ["--dry-run"]):
        assert run_train("--config", QUICKSTART, "--device", "cpu", f"save_dir={tmp_path}", *extra, *dry) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0], errors
        assert not (tmp_path / "models").exists()


def test_no_full_batch_on_each_process_names_the_processes():
    """The same check with two processes: the global batch of 1,298 is more than the 1,297 digits."""
    exp = validate(load_config(QUICKSTART) | {"train_dataloader": {
        "type": "digits_dataloader", "args": {"batch_size": 1298, "transform_type": "digits", "n_augs": 2,
                                              "shuffle": True}}}, world_size=2)
    loader = build_loader(exp.train_dataloader, LoaderRuntime(rank=1, world_size=2))
    for dry_run in (False, True):
        with pytest.raises(ConfigError, match=r"batch_size: 1298 \(the global batch; 649 on each of 2 processes\) "
                                              r"is more than the 1297 training samples"):
            steps_per_epoch(loader, dry_run)


def test_a_warm_up_as_long_as_the_run_is_allowed():
    """The quickstart's `--epochs 1` (the shortened runs of the tests) warms up for its whole epoch."""
    assert run_train("--config", QUICKSTART, "--device", "cpu", "--epochs", "1", "--dry-run") == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--world-size", "4"], "--world-size 4 needs --distributed: without it the run is one process"),
        (["--dist-url", "tcp://127.0.0.1:1234"], "--dist-url tcp://127.0.0.1:1234 needs --distributed"),
        (["--dist-timeout", "5"], "--dist-timeout 5.0 needs --distributed"),
        (["--distributed", "--dist-timeout", "0"], "--dist-timeout 0.0: a number of seconds above 0"),
        (["--gpu", "3"], "--gpu 3 contradicts --device cpu: give one of them"),
        (["--distributed", "--world-size", "2", "--device", "cuda", "--gpu", "1"],
         "--gpu 1 contradicts --distributed: each process takes the GPU of its local rank"),
        (["--epochs", "1", "trainer.epochs=3"],
         "--epochs 1 and the override trainer.epochs=3 both set trainer.epochs: give one of them"),
        (["trainer.init_val=true", "--init_val", "0"], "--init_val 0 and the override trainer.init_val=true both set"),
        (["--name", "a", "name=b"], "--name a and the override name=b both set name"),
    ],
)
def test_contradictory_flags_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for run in (run_train, run_eval):
        assert run("--config", QUICKSTART, "--device", "cpu", f"save_dir={tmp_path}", "--dry-run", *extra) == 2
        err = capsys.readouterr().err
        assert _errors(err) == err.strip().splitlines() and len(_errors(err)) == 1 and message in err, err
    assert not (tmp_path / "models").exists()


def test_the_readme_flags_still_parse(tmp_path, capsys):
    """`--gpu 0` with the default device (the CPU where there is no GPU), `--world-size 1`,
    `-name`, a flag and overrides of other keys."""
    assert run_train("--config", QUICKSTART, "--gpu", "0", "--world-size", "1", "-name", "n", "--epochs", "2",
                     "trainer.log_step=1", "--init_val", "0", f"save_dir={tmp_path}", "--dry-run") == 0
    assert run_eval("--config", QUICKSTART, "--gpu", "0", "--dry-run") == 0
    assert not _errors(capsys.readouterr().err)


def test_eval_resume_auto_needs_a_checkpoint(tmp_path, capsys):
    """eval.py --resume auto without a checkpoint is one error line and exit 2, not an evaluation of
    a random encoder; train.py's starts a new run (dry run here)."""
    argv = ["--config", QUICKSTART, "--device", "cpu", f"save_dir={tmp_path}", "--resume", "auto"]
    assert run_eval(*argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == _errors(err) and len(_errors(err)) == 1
    assert f"--resume auto: no checkpoint under {tmp_path / 'models' / 'quickstart'} to evaluate" in err
    assert not (tmp_path / "models").exists()
    assert run_train(*argv, "--dry-run") == 0
    assert "no checkpoint under" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])  # SIGINT: test_train.py, Ctrl-C during an evaluation
def test_a_stopped_run_exits_128_plus_the_signal(tmp_path, monkeypatch, sig):
    """A stop after the first step, in-process: the exit status a shell gives a process killed by
    the signal, and under SLURM the SIGUSR1 requeue still happens (a stand-in `scontrol`)."""
    signum = getattr(signal, sig)
    calls = tmp_path / "scontrol.log"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]))\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    sent = threading.Event()

    def stop_after_the_first_step():
        deadline = time.time() + 60
        while time.time() < deadline and not sent.is_set():
            logs = list(tmp_path.glob("models/quickstart/*/metrics.jsonl"))
            if logs and '"loss"' in logs[0].read_text():
                os.kill(os.getpid(), signum)
                sent.set()
            time.sleep(0.01)

    previous = signal.signal(signum, lambda *_: None)  # a signal after the run must not end pytest
    watcher = threading.Thread(target=stop_after_the_first_step, daemon=True)
    watcher.start()
    try:
        code = run_train("--config", QUICKSTART, *TINY, "--device", "cpu", "--epochs", "2", "trainer.log_step=1",
                         *FAST, f"save_dir={tmp_path}")
    finally:
        sent.set()
        watcher.join()
        signal.signal(signum, previous)
    assert code == 128 + signum
    assert 0 < load_checkpoint(only_run_dir(tmp_path, "quickstart") / "latest_model.pth")["step"] < 10
    requeued = calls.read_text() if calls.exists() else ""
    assert requeued == ("requeue 4242" if sig == "SIGUSR1" else "")


@pytest.mark.slow
def test_a_lone_rank_says_it_waits_and_gives_up(tmp_path):
    """The README's launch variables for 2 processes with only rank 0 started: it logs that it
    waits (every quarter of the short timeout here), then one line and exit status 2."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "train.py", "--config", str(QUICKSTART), "--distributed", "--world-size",
                           "2", "--device", "cpu", "--dist-timeout", "1", f"save_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(rf"rank 0: still waiting after [\d.]+ s for the 2 processes to join at 127\.0\.0\.1:{port}",
                     done.stderr), done.stderr[-3000:]
    errors = _errors(done.stderr)
    assert len(errors) == 1 and "did not all join at" in errors[0] and "(--dist-timeout 1 s)" in errors[0], errors
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_lone_rank_gives_up_in_process(tmp_path, monkeypatch, capsys, rank):
    """Rank 0 waiting for a client, and rank 1 with no store to connect to: both say that they wait
    and give up in one line."""
    port = free_port()
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    for var, value in (("RANK", str(rank)), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        monkeypatch.setenv(var, value)
    assert run_train("--config", QUICKSTART, "--distributed", "--world-size", "2", "--device", "cpu",
                     "--dist-timeout", "0.5", f"save_dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert re.search(rf"rank {rank}: still waiting after [\d.]+ s for the 2 processes to join at 127\.0\.0\.1:{port}",
                     err), err
    errors = _errors(err)
    assert len(errors) == 1 and f"rank {rank} of 2: the processes did not all join" in errors[0], errors
    assert not (tmp_path / "models").exists()
