"""train.py / eval.py end to end on the bundled digits: dry run, bad input, checkpoints, exact
resume, a non-finite loss, and the quickstart's learning."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from PIL import Image

from model.encoder import build_resnet
from trainer.build import build_model
from trainer.checkpoint import CheckpointError, load_checkpoint, load_module_state, save_checkpoint
from trainer.preemption import StopSignal
from utils.config import apply_overrides, load_config
from utils.dist import ProcessInfo
from utils.schema import validate

from .conftest import (
    GENTLE_LR,
    QUICKSTART,
    ROOT,
    TINY,
    copy_run,
    last_json_line,
    only_run_dir,
    run_eval,
    run_train,
    signal_after_steps,
)

FAST = ["evaluator=null", "trainer.init_val=false"]


def test_dry_run_prints_settings_and_json_summary(tmp_path, capsys):
    """No --device: the CPU is picked by itself and said so; nothing is written. (In-process: the
    README's dry run in a fresh process is test_paper_configs.py's test_readme_command_in_a_fresh_process.)"""
    assert run_train("--config", QUICKSTART, "--dry-run", f"save_dir={tmp_path}",
                     "--results-json", tmp_path / "results.json") == 0
    out = capsys.readouterr()
    assert "a dry run has no results and does not write it" in out.err
    summary = last_json_line(out.out)
    assert summary["learning_rate"] == pytest.approx(32.0)  # 4.0 * 32 * 256 / 1024
    assert summary["batch_size_per_process"] == 256 and summary["epochs"] == 50 and summary["loss"] == "GroCo"
    assert summary["steps_per_epoch"] == 5 and summary["warmup_steps"] == 5 and summary["total_steps"] == 250
    assert "base_learning_rate: 4.0" in out.out
    if not torch.cuda.is_available():
        assert "running on the CPU (no CUDA device found)" in out.err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_overrides_and_eval_dry_run(tmp_path, capsys):
    argv = ["--config", QUICKSTART, "--dry-run", "--epochs", "7", "base_learning_rate=0.5", f"save_dir={tmp_path}"]
    assert run_train(*argv) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["epochs"] == 7 and summary["learning_rate"] == pytest.approx(4.0)
    assert run_eval("--config", QUICKSTART, "--dry-run", "--device", "cpu") == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["evaluators"] == ["KNNEvaluator"]
    assert summary["batch_size_per_process"] == {"train_dataloader": 256, "valid_dataloader.0": 512,
                                                 "valid_dataloader.1": 512}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config", "configs/none.yaml"], "config file not found: configs/none.yaml"),
        (["loss.type=Sorter"], "loss.type: unknown loss type 'Sorter'; valid types: GroCo"),
        (["trainer.epochz=2"], "trainer.epochz: unknown key"),
        (["--resume", "nowhere/latest_model.pth"], "checkpoint not found: nowhere/latest_model.pth"),
        (["trainer.compile=fast"], "trainer.compile: 'fast' is not one of ['default', 'reduce-overhead'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    argv = ["--config", QUICKSTART, f"save_dir={tmp_path}"]
    if extra[0] == "--config":
        argv = [*extra, f"save_dir={tmp_path}"]
    else:
        argv += extra
    assert run_train(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ERROR" in err[0] and message in err[0]
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["loss.args.n_augs=3"], "loss.args.n_augs: the loss takes 3 views, but the training loader makes 2"),
        (["loss={type: NT_XentAllCombinations, args: {n_augs: 4}}"], "loss.args.n_augs: the loss takes 4 views"),
        (["loss.args.topk_neg=300"], "loss.args.topk_neg: 300 negatives per anchor need a global batch of at least "
                                     "301 (train_dataloader.args.batch_size), got 256"),
        (["loss.args.topk_neg=0"], "loss.args.topk_neg must be at least 1, got 0"),
        (["projection.args.num_layers=0"], "projection.args.num_layers must be at least 1, got 0"),
        (["loss={type: NT_Xent, args: {topk_neg: 600}}"], "loss.args.topk_neg: 600, but a global batch of 256 "
                                                           "gives an anchor 510 negatives"),
    ],
)
def test_values_the_built_parts_judge_fail_before_the_run_folder(tmp_path, capsys, extra, message):
    """Values checked once the loss and model are built (the views and batch against the loss
    were found only at the first step, with a traceback and a run folder left behind); a dry
    run refuses them too."""
    for dry in ([], ["--dry-run"]):
        assert run_train("--config", QUICKSTART, "--device", "cpu", f"save_dir={tmp_path}", *extra, *dry) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
        assert not (tmp_path / "models").exists()


def test_unknown_arch_is_named_before_the_width(tmp_path, capsys):
    """The quickstart's narrow ResNet (width 16) with a misspelt arch: the error is about the arch."""
    assert run_train("--config", QUICKSTART, f"save_dir={tmp_path}", "encoder.args.arch=resnet19") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "encoder.args.arch: unknown ResNet 'resnet19'" in errors[0]


def test_resnet10_is_resnet18_with_one_block_a_stage():
    """`arch: resnet10` (the compile tests' small model) keeps torchvision's key names, at any width."""
    for width in (64, 16):
        keys = set(build_resnet("resnet10", width=width).state_dict())
        resnet18 = build_resnet("resnet18", width=width).state_dict()
        first_blocks = {k for k in resnet18 if not re.match(r"layer\d\.1\.", k)}
        assert first_blocks == keys
        assert "layer4.0.conv2.weight" in keys and not any(k.startswith("layer1.1.") for k in keys)


def test_missing_data_is_one_clear_line_before_any_run_folder(tmp_path, capsys):
    """A folder that is not there, a split smaller than one training batch, shards that were never
    written, an evaluator with fewer classes than the data: exit status 2 with one line naming the
    argument and the path, and no run folder."""
    tiny, three = tmp_path / "tiny", tmp_path / "three"
    for split in ("train", "val"):
        (tiny / split / "a").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(tiny / split / "a" / f"{i}.jpg")
            (three / split / "abc"[i]).mkdir(parents=True)
            Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(three / split / "abc"[i] / f"{i}.jpg")
    knn_of_two = [f"train_dataloader.args.root={three}", "train_dataloader.args.batch_size=3", "loss.args.topk_neg=1",
                  f"valid_dataloader=[{{type: image_folder_dataloader, args: {{root: {three}, shuffle: false, "
                  f"batch_size: 4, train: true}}}}, {{type: image_folder_dataloader, args: {{root: {three}, "
                  f"shuffle: false, batch_size: 4, train: false}}}}]",
                  "evaluator=[{type: KNNEvaluator, args: {k: [1], num_classes: 2, temperature: 0.07}}]"]
    folders = ["--config", "configs/examples/imagenet_folders.yaml", "evaluator=null", "--device", "cpu",
               f"save_dir={tmp_path}"]
    cases = [
        (run_train, [*folders, f"train_dataloader.args.root={tmp_path / 'absent'}"],
         f"root: {tmp_path / 'absent' / 'train'}: no such folder"),
        (run_train, [*folders, f"train_dataloader.args.root={tiny}"],
         "train_dataloader.args.batch_size: 32 (the global batch; 1 process) is more than the 3 training samples"),
        (run_eval, ["--config", "configs/eval_knn.yaml", "encoder.type=RegularEncoder", "encoder.args.arch=resnet18",
                    f"valid_dataloader.0.args.shards={tmp_path}/train-{{0..3}}.tar", "--device", "cpu",
                    f"save_dir={tmp_path}"],
         f"shards: 4 of the 4 shard files do not exist, the first {tmp_path}/train-0.tar"),
        (run_train, [*folders, *knn_of_two],
         f"evaluator.0.args.num_classes: 2, but {three / 'train'} has 3 class folders"),
        (run_train, ["--config", QUICKSTART, "--device", "cpu", "evaluator.0.args.num_classes=5",
                     f"save_dir={tmp_path}"], "evaluator.0.args.num_classes: 5, but the digits have 10 classes"),
    ]
    for run, argv, message in cases:
        capsys.readouterr()
        assert run(*argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys, trained_run):
    run = copy_run(trained_run, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bogus = run / "config.yaml"
    capsys.readouterr()
    assert run_train("--resume", bogus, "--device", "cpu") == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert run_eval("--resume", bogus, "--device", "cpu") == 2


@pytest.mark.slow
def test_checkpoint_format_and_module_prefix(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "latest_model.pth", "metrics.jsonl",
                                                    "results.json", "sacred", "train.log"]
    sacred_run = json.loads((run / "sacred" / "1" / "run.json").read_text())
    assert sacred_run["status"] == "COMPLETED"
    assert "epoch/train_loss" in json.loads((run / "sacred" / "1" / "metrics.json").read_text())
    ckpt = load_checkpoint(run / "latest_model.pth")
    assert {"epoch", "step", "encoder", "projection", "optimizer", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 5
    assert "encoder.conv1.weight" in ckpt["encoder"] and "projection.0.weight" in ckpt["projection"]
    assert ckpt["config"]["derived"]["learning_rate"] == pytest.approx(32.0)
    saved_config = yaml.safe_load((run / "config.yaml").read_text())
    assert saved_config["trainer"]["epochs"] == 1 and saved_config["name"] == "quickstart"

    # the released format: DDP keys with `module.`, the legacy serialisation
    released = dict(ckpt)
    released["encoder"] = {f"module.{k}": v for k, v in ckpt["encoder"].items()}
    released["projection"] = {f"module.{k}": v for k, v in ckpt["projection"].items()}
    legacy = tmp_path / "released.pth"
    torch.save(released, legacy, _use_new_zipfile_serialization=False)
    exp = validate(apply_overrides(load_config(QUICKSTART), TINY))  # the model trained_run trained
    for state in (ckpt, load_checkpoint(legacy)):
        net = build_model(exp, ProcessInfo())
        load_module_state(net.encoder, state["encoder"], "encoder")
        load_module_state(net.projection, state["projection"], "projection")
        for name, value in net.encoder.state_dict().items():
            assert torch.equal(value, ckpt["encoder"][name])

    broken = {k: v for k, v in ckpt["encoder"].items() if k != "encoder.fc.weight" and "layer4.0.bn2" not in k}
    broken["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.layer4.0.bn2.weight'.*unexpected keys "
                                              r"\['encoder.extra.weight'\]"):
        load_module_state(build_model(exp, ProcessInfo()).encoder, broken, "encoder")


def test_atomic_save_leaves_no_temporary(tmp_path):
    save_checkpoint({"epoch": 0, "encoder": {}}, tmp_path / "latest_model.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["latest_model.pth"]
    # a write that fails (here: a value torch.save cannot pickle) keeps the old file, leaves no other
    with pytest.raises(TypeError, match="cannot pickle"):
        save_checkpoint({"epoch": 1, "encoder": {}, "lock": threading.Lock()}, tmp_path / "latest_model.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["latest_model.pth"]
    assert load_checkpoint(tmp_path / "latest_model.pth")["epoch"] == 0


def _weights_equal(a: dict, b: dict) -> None:
    for part in ("encoder", "projection"):
        for name, value in a[part].items():
            difference = (value.double() - b[part][name].double()).abs().max().item()
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs, by up to {difference:.3g}"
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])


def _step_losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, small_quickstart):
    """2 epochs in one go == 1 epoch, then --resume for the second (same weights, bit for bit),
    continued in the checkpoint's own run folder; the results (k-NN before training and after each
    epoch) are those of the run in one go, not a second "initial" evaluation at the resume. The
    checkpoint copied alone into an empty folder with its config.yaml continues to the same."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = [a for a in small_quickstart if not str(a).startswith("save_dir=")] + [
        *TINY, "evaluator.0.args.apply_evaluator_per_epoch=1"]
    assert run_train(*base, f"save_dir={straight}", "--epochs", "2", "--results-json", tmp_path / "straight.json") == 0
    assert run_train(*base, f"save_dir={split}", "--epochs", "1") == 0
    run = only_run_dir(split, "quickstart")
    alone = tmp_path / "alone"  # the checkpoint and its config.yaml alone: no metrics.jsonl
    alone.mkdir()
    for name in ("latest_model.pth", "config.yaml"):
        shutil.copy(run / name, alone / name)
    unrecorded = tmp_path / "unrecorded"  # the run of 1 epoch again (the same bits), for the part below
    cut = copy_run(run, unrecorded)
    assert run_train("--resume", run / "latest_model.pth", "--epochs", "2", "--device", "cpu",
                     "--results-json", tmp_path / "split.json") == 0
    results = json.loads((tmp_path / "split.json").read_text())
    assert results == json.loads((tmp_path / "straight.json").read_text())
    assert results["initial"] and [e["epoch"] for e in results["epochs"]] == [0, 1]
    assert sum(1 for line in open(run / "metrics.jsonl") if '"initial"' in line) == 1
    assert run_train("--resume", alone / "latest_model.pth", "--epochs", "2", "--device", "cpu") == 0
    assert json.loads((alone / "results.json").read_text()) == results
    _weights_equal(load_checkpoint(alone / "latest_model.pth"), load_checkpoint(run / "latest_model.pth"))

    # the checkpoint a run writes after epoch 0's training and before its evaluation (the run then
    # stopped by a signal in that epoch's last step), made from the final one: the resumed run
    # evaluates and records epoch 0 first, and its log has that record once
    ckpt = load_checkpoint(cut / "latest_model.pth")
    record = ckpt["results"]["epochs"].pop()
    ckpt["unrecorded"] = {k: record[k] for k in ("epoch", "step", "train_loss", "lr")}
    save_checkpoint(ckpt, cut / "latest_model.pth")
    assert run_train("--resume", cut / "latest_model.pth", "--epochs", "2", "--device", "cpu",
                     "--results-json", tmp_path / "unrecorded.json") == 0
    assert json.loads((tmp_path / "unrecorded.json").read_text()) == results
    assert (cut / "metrics.jsonl").read_text().count('"knn@20_online"') == 3  # initial, epochs 0 and 1
    assert only_run_dir(split, "quickstart") == run  # no second folder
    a = load_checkpoint(only_run_dir(straight, "quickstart") / "latest_model.pth")
    b = load_checkpoint(run / "latest_model.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"] == 10
    _weights_equal(a, b)
    assert _step_losses(only_run_dir(straight, "quickstart")) == _step_losses(run)  # every step once, equal
    assert sorted(p.name for p in run.glob("config*.yaml"))[0].startswith("config.before_")  # epochs changed


@pytest.mark.slow
def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path, small_quickstart, capsys):
    assert run_train(*small_quickstart, *TINY, "--resume", "auto", "--epochs", "1", *FAST) == 0  # nothing yet: starts
    run = only_run_dir(tmp_path, "quickstart")
    assert "no checkpoint under" in capsys.readouterr().err
    newer = tmp_path / "models" / "quickstart" / "9999_999999"
    newer.mkdir()
    (newer / "latest_model.pth").write_bytes(b"cut short")  # newest, but corrupt: skipped
    assert run_train(*small_quickstart, *TINY, "--resume", "auto", "--epochs", "2", *FAST) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and f"continuing from {run / 'latest_model.pth'}" in err
    assert load_checkpoint(run / "latest_model.pth")["epoch"] == 1


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resumes_exactly(tmp_path, small_quickstart):
    """A real SIGTERM to a training process: it finishes the step, saves, exits 143; resuming ends
    with the weights of a run that was never interrupted, the epoch after the stop included."""
    argv = [str(a) for a in small_quickstart] + [*TINY, "--epochs", "2", "trainer.log_step=1", *FAST]
    interrupted = tmp_path / "interrupted"
    run, code, err = signal_after_steps([*argv, f"save_dir={interrupted}"], interrupted / "models" / "quickstart",
                                        2)  # inside epoch 0
    assert run is not None and code == 128 + signal.SIGTERM, err
    assert "received SIGTERM" in err and "stopped by SIGTERM" in err
    ckpt = load_checkpoint(run / "latest_model.pth")
    assert ckpt["epoch_step"] > 0 and ckpt["step"] == 5 * (ckpt["epoch"] + 1) + ckpt["epoch_step"] < 10

    assert run_train("--resume", run / "latest_model.pth", "--device", "cpu") == 0
    assert run_train(*small_quickstart, *TINY, "--epochs", "2", "trainer.log_step=1", *FAST,
                     f"save_dir={tmp_path / 'straight'}") == 0
    straight = only_run_dir(tmp_path / "straight", "quickstart")
    expected, resumed = _step_losses(straight), _step_losses(run)
    first_difference = next((i for i, (a, b) in enumerate(zip(expected, resumed)) if a != b), None)
    assert expected == resumed, f"stopped after step {ckpt['step']}; losses differ from step {first_difference}"
    _weights_equal(load_checkpoint(straight / "latest_model.pth"), load_checkpoint(run / "latest_model.pth"))
    # the interrupted epoch's train_loss averages all its steps, those before the stop included
    resumed_results = json.loads((run / "results.json").read_text())
    assert resumed_results == json.loads((straight / "results.json").read_text())


@pytest.mark.slow
def test_ctrl_c_during_an_evaluation_stops_after_it(tmp_path, small_quickstart, capsys):
    """Ctrl-C during an epoch's k-NN evaluation: sent (in-process, to the process itself) once the
    run's train.log says that the evaluation after epoch 0 has begun (it lasts long here, seconds:
    the 1,797 digits four at a time). The run stops with that epoch's checkpoint once the evaluation
    ends, without starting the next epoch, and exits 130. (A real process stopped by a signal:
    test_sigterm_mid_epoch_saves_and_resumes_exactly.)"""
    argv = [*small_quickstart, *TINY, "--epochs", "3", "trainer.init_val=false",
            "evaluator.0.args.apply_evaluator_per_epoch=1", "valid_dataloader.0.args.batch_size=4",
            "valid_dataloader.1.args.batch_size=4"]
    sent = threading.Event()

    def interrupt_the_evaluation():
        deadline = time.time() + 120
        while time.time() < deadline and not sent.is_set():
            logs = list(tmp_path.glob("models/quickstart/*/train.log"))
            if logs and "KNNEvaluator after epoch 0: evaluating" in logs[0].read_text():
                os.kill(os.getpid(), signal.SIGINT)
                sent.set()
            time.sleep(0.01)

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a SIGINT after the run must not end pytest
    watcher = threading.Thread(target=interrupt_the_evaluation, daemon=True)
    watcher.start()
    try:
        code = run_train(*argv)
    finally:
        sent.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    log = capsys.readouterr().err
    assert code == 130 and "stopped by SIGINT" in log, log[-3000:]
    run = only_run_dir(tmp_path, "quickstart")
    ckpt = load_checkpoint(run / "latest_model.pth")
    assert ckpt["epoch"] == 0 and ckpt["epoch_step"] == 0 and ckpt["step"] == 5
    assert '"knn@20_online"' in (run / "metrics.jsonl").read_text()  # the evaluation ran to its end


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once():
    """The first SIGINT is recorded like SIGTERM (the trainer saves after its step); the second
    raises KeyboardInterrupt; the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler in the main thread, between two bytecodes
        assert stop.signum == signal.SIGINT and stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_runs_where_the_signal_module_has_no_sigusr1(tmp_path):
    """Windows has no SIGUSR1 (SLURM's warning signal): train.py still imports and trains there."""
    script = ("import signal, sys; del signal.SIGUSR1; import train; "
              f"sys.exit(train.main(['--config', {str(QUICKSTART)!r}, *{TINY!r}, '--epochs', '1', '--device', "
              f"'cpu', 'evaluator=null', 'trainer.init_val=false', 'save_dir={tmp_path}']))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(only_run_dir(tmp_path, "quickstart") / "latest_model.pth")["epoch"] == 0


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, trained_run):
    good = copy_run(trained_run, tmp_path) / "latest_model.pth"
    good_bytes = good.read_bytes()
    capsys.readouterr()
    code = run_train("--resume", good, "--epochs", "2", "base_learning_rate=1e30", "warmup_epochs=0",
                     "--device", "cpu")
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss became non-finite in epoch 1" in err and "last good checkpoint" in err
    assert good.read_bytes() == good_bytes


@pytest.mark.slow
def test_quickstart_learns(tmp_path, small_quickstart):
    """A shortened quickstart (6 epochs) still lifts held-out k-NN accuracy far above its start."""
    results = tmp_path / "results.json"
    code = run_train(*small_quickstart, "--epochs", "6", "evaluator.0.args.apply_evaluator_per_epoch=6",
                     "--results-json", results)
    assert code == 0
    metrics = json.loads(results.read_text())
    start, end = metrics["initial"]["knn@20_online"], metrics["final"]["knn@20_online"]
    assert end >= 0.85 and end - start >= 0.12, (start, end)
    run = only_run_dir(tmp_path, "quickstart")
    assert json.loads((run / "results.json").read_text()) == metrics
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 30 and {"lr", "grad_norm", "samples_per_s", "info_pos_neg_dist"} <= set(steps[0])
    assert steps[0]["lr"] == 0.0  # warm-up starts at zero: step 0 has lr 0

    # eval.py on the trained checkpoint reproduces the online k-NN
    assert run_eval("--resume", run / "latest_model.pth", "--device", "cpu", "--results-json",
                    tmp_path / "eval.json") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["final"]["knn@20_online"] == pytest.approx(end)


@pytest.mark.slow
def test_channels_last_computes_the_same(tmp_path, small_quickstart):
    """trainer.channels_last changes the memory layout, not the numbers (beyond rounding)."""
    base = [a for a in small_quickstart if not str(a).startswith("save_dir=")]
    for layout in ("false", "true"):
        assert run_train(*base, f"save_dir={tmp_path / layout}", "--epochs", "1", *FAST, *TINY, *GENTLE_LR,
                         f"trainer.channels_last={layout}") == 0
    plain, nhwc = (_step_losses(only_run_dir(tmp_path / layout, "quickstart")) for layout in ("false", "true"))
    assert len(plain) == 5 and plain == pytest.approx(nhwc, rel=1e-3)


@pytest.mark.compile(first=True)  # its model's graphs are those of the DDP test and the probe (128 a process)
@pytest.mark.slow
def test_compile_computes_the_same(tmp_path, small_quickstart):
    """trainer.compile (here in the CUDA-graph mode, which on the CPU compiles without graphs) trains
    the model and the loss compiled to the same step losses as eager, and its metrics survive."""
    base = [a for a in small_quickstart if not str(a).startswith("save_dir=")]
    for mode in ("false", "reduce-overhead"):
        assert run_train(*base, f"save_dir={tmp_path / mode}", "--epochs", "1", *FAST, *TINY, *GENTLE_LR,
                         "train_dataloader.args.batch_size=128", "trainer.log_step=2", f"trainer.compile={mode}") == 0
    eager, compiled = (_step_losses(only_run_dir(tmp_path / m, "quickstart")) for m in ("false", "reduce-overhead"))
    assert len(compiled) == 10 and compiled == pytest.approx(eager, rel=1e-3)
