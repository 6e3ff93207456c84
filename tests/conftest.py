"""Shared test helpers: run the entry points in-process on the bundled digits."""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Before torch loads: inductor writes scalar C++ for the CPU in the tests (and in the processes they
# start), puts a graph's kernels and wrapper in one C++ file (TORCHINDUCTOR_CPP_WRAPPER: one gcc
# run a graph instead of one a kernel), and gcc compiles it at -O0 (TORCHINDUCTOR_DEBUG_COMPILE):
# each step cuts the compile time of the compile tests (README, "Tests"). The graphs, their
# lowering and inductor's floating-point flags are the same, only the C++ around them differs;
# training compiles for the GPU, where none of these settings applies.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")
os.environ.setdefault("TORCHINDUCTOR_CPP_WRAPPER", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N runs N workers (pyproject: one a core): each computes on one thread and compiles
    # in its own process. OpenMP threads that outnumber the cores spin against each other: a
    # training test ran four times slower beside a compile test.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import eval as eval_entry  # noqa: E402
import train as train_entry  # noqa: E402
from utils.dist import free_port  # noqa: E402
from utils.logging import get_logger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"
# Tests of the run's mechanics (resume, signals, processes, trackers, compiling), not of what it
# learns: the quickstart's data, batches and steps on ResNet-10 at width 8 (8-16-32-64 channels),
# about a quarter of the quickstart's compute per step; under torch.compile, half of ResNet-18's
# graph to compile.
TINY = ["encoder.args.arch=resnet10", "encoder.args.width=8"]
# One quickstart epoch with the learning rates that its first 5 steps had under a 2-epoch warm-up
# (3.2 more each step): tests comparing two numerically different paths (memory layout, compiled,
# DDP) at rel 1e-3 need the drift that such rates give; at the full ramp it reaches 0.16%.
GENTLE_LR = ["base_learning_rate=2.0"]
EXIT_GRACE_S = 300


def pytest_unconfigure(config):
    """After the summary: a test run whose interpreter has not ended EXIT_GRACE_S seconds later is
    waiting at exit for something a test left behind (a thread, a child process). Print where
    every thread stands and exit with status 1, rather than hang CI until its limit. Only where
    pytest is the program (`pytest`, `python -m pytest`): a notebook that ran pytest.main goes on."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if (spec is not None and spec.name == "pytest.__main__") or Path(sys.argv[0]).name in ("pytest", "py.test"):
        faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)


def pytest_collection_modifyitems(items):
    """The compile tests first, then the other slow ones, otherwise in file order: the workers then
    share out the quick ones at the end, instead of one worker finishing a long test alone. Among
    the compile tests, those marked `compile(first=True)` lead: pytest-xdist hands the first half of
    this order to one worker, which runs it in order, so the tests after them find the graphs they
    compiled in inductor's cache (TORCHINDUCTOR_CACHE_DIR, shared by every process of the run)."""
    def order(item):
        compiled = item.get_closest_marker("compile")
        first = compiled is not None and compiled.kwargs.get("first", False)
        return compiled is None, not first, item.get_closest_marker("slow") is None

    items.sort(key=order)


# The paper's 2views_100ep.yaml: the values every other experiment is described against.
PAPER_2VIEWS_100EP = """
train_dataloader:
  type: web_dataloader
  args: {shards: "./data/imagenet/processed/train/imagenet-train-{000000..000639}.tar", dataset_size: 1280000,
         shuffle: 10000, num_workers: 16, batch_size: 1024, transform_type: dino, n_augs: 2}
valid_dataloader:
- type: web_dataloader
  args: {shards: "./data/imagenet/processed/train/imagenet-train-{000000..000639}.tar", dataset_size: 1280000,
         shuffle: 10000, num_workers: 16, batch_size: 4096, train: true, transform_type: linear_prob}
- type: web_dataloader
  args: {shards: "./data/imagenet/processed/val/imagenet-val-{000000..000099}.tar", dataset_size: 50000,
         shuffle: 0, num_workers: 16, batch_size: 4096, train: false}
encoder: {type: RegularEncoder, args: {arch: resnet50}}
projection: {type: RegularProjection, args: {num_layers: 3, output_dim: 2048}}
loss: {type: GroCo, args: {n_augs: 2, topk_neg: 10, steepness: 1}}
learning_rate_scaling: linear
base_learning_rate: 0.75
optimizer_use_larc: false
warmup_epochs: 1
optimizer: {type: SGD, args: {momentum: 0.9, weight_decay: 1.0e-06}}
trainer: {epochs: 100, mixed_precision: true, init_val: false, save_latest: true, save_period: null, log_step: 50,
          clip_grad: 1000000.0}
seed: null
save_dir: ./output
evaluator:
- type: KNNEvaluator
  args: {log_name: _online, apply_evaluator_per_epoch: 10, k: [20], num_classes: 1000, temperature: 0.07,
         max_feature_bank: 30000}
- type: LinearProbingEvaluator
  args:
    hyperparams:
    - log_name: _regular
      apply_evaluator_after_epochs: [99]
      epochs: 90
      base_learning_rate: 0.1
      batch_size: 4096
      optimizer: {type: SGD, args: {momentum: 0.9, weight_decay: 0.0}}
      optimizer_use_larc: true
      lr_scheduler: {type: CustomCosineSchedulerWithWarmup, args: {epochs: 90, warmup_epochs: 0}}
"""


def run_train(*argv: str) -> int:
    return train_entry.main([str(a) for a in argv])


def run_eval(*argv: str) -> int:
    return eval_entry.main([str(a) for a in argv])


def run_bench(main, argv: list[str], monkeypatch, capsys) -> str:
    """A bench's `main` run in this process as `python -m bench.<name> *argv` runs it (its import
    and torch's already paid); what it printed. The process's random state and cuDNN setting are
    restored after."""
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    capsys.readouterr()
    with torch.random.fork_rng(devices=[]):
        main()
    return capsys.readouterr().out


def fork_ranks(argv: list, world_size: int = 2, timeout: float = 300) -> list[int]:
    """`train.py --distributed --world-size N *argv` as N processes forked from this one, each with
    the variables torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on
    127.0.0.1): a one-node launch without a fresh interpreter a process (torch's and torchvision's
    imports, some 5 CPU-seconds each). For runs whose launch is not what a test checks. Returns
    the exit codes."""
    port, context = free_port(), multiprocessing.get_context("fork")
    procs = [context.Process(target=_forked_rank, args=(rank, world_size, port, [str(a) for a in argv]))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.time() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _forked_rank(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    # one thread: a forked process must not run OpenMP threads its parent may have run (it can hang)
    torch.set_num_threads(1)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[name]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.exit(run_train("--distributed", "--world-size", str(world_size), *argv))


def only_run_dir(save_dir: Path, name: str) -> Path:
    """The single run folder under save_dir/models/name."""
    runs = sorted((save_dir / "models" / name).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One epoch of the quickstart on the TINY model without evaluators, every step logged: a
    finished run folder, trained once per test process. Tests that change a run folder work on a `copy_run` of it."""
    save_dir = tmp_path_factory.mktemp("trained")
    assert run_train("--config", QUICKSTART, *TINY, "--device", "cpu", "--epochs", "1", "evaluator=null",
                     "trainer.init_val=false", "trainer.log_step=1", f"save_dir={save_dir}") == 0
    return only_run_dir(save_dir, "quickstart")


def copy_run(run: Path, save_dir: Path) -> Path:
    """A copy of the run folder `run` as `save_dir/models/quickstart/<its name>`."""
    return Path(shutil.copytree(run, save_dir / "models" / "quickstart" / run.name))


@pytest.fixture
def small_quickstart(tmp_path):
    """Quickstart arguments for a short CPU run writing under tmp_path."""
    return ["--config", QUICKSTART, f"save_dir={tmp_path}", "--device", "cpu"]


@pytest.fixture
def warnings_of_groco(caplog):
    """Captures the project logger's warnings (its propagation may be off once logging is set up)."""
    logger = get_logger()
    direct = not logger.propagate  # caplog's handler sits on the root logger
    if direct:
        logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        yield caplog
    if direct:
        logger.removeHandler(caplog.handler)


def signal_after_steps(argv: list, runs: Path, steps: int, timeout: float = 120,
                       signum: int = signal.SIGTERM) -> tuple[Path | None, int, str]:
    """Start `train.py *argv`; once its run folder under `runs` (save_dir/models/<name>) has logged
    `steps` step lines, send it `signum` (a point the run reports, not a delay). Returns the run
    folder (None if the signal was never sent), the exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(runs.glob("*/metrics.jsonl"))
        if found and sum('"loss"' in line for line in found[0].read_text().splitlines()) >= steps:
            run = found[0].parent
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    err = proc.communicate(timeout=timeout)[1]
    return run, proc.returncode, err
