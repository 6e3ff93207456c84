"""Several processes compute what one process computes on the combined batch (CPU, gloo), and the
torchrun launch path of the README runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from data_loader.base import LoaderRuntime
from model.loss import GroCo, NT_Xent, NT_XentAllCombinations
from trainer.build import build_loader, build_loss, build_model
from trainer.checkpoint import load_checkpoint, load_module_state
from trainer.loggers import mlflow_name
from utils.config import apply_overrides, load_config
from utils.dist import LaunchError, ProcessInfo, free_port, init_process
from utils.rng import resolve_seed
from utils.schema import validate

from .conftest import GENTLE_LR, QUICKSTART, ROOT, TINY, copy_run, fork_ranks, only_run_dir
from .test_trackers import HAVE_MLFLOW, HAVE_TENSORBOARD

BATCH, DIM = 12, 16
LOSSES = {
    "groco_stop_grad": lambda d: GroCo(distributed=d, n_augs=2, topk_neg=5, stop_grad=True),
    "groco_full_grad": lambda d: GroCo(distributed=d, n_augs=3, topk_neg=5, stop_grad=False),
    "groco_multicrop": lambda d: GroCo(distributed=d, n_augs=4, n_pos_augs=2, topk_neg=5),
    "nt_xent": lambda d: NT_Xent(distributed=d, temperature=0.5),
    "nt_xent_topk_stop_grad": lambda d: NT_Xent(distributed=d, temperature=0.5, topk_neg=5, stop_grad=True),
    "nt_xent_all_combinations": lambda d: NT_XentAllCombinations(distributed=d, n_augs=3, temperature=0.1),
}
VIEWS = {"groco_full_grad": 3, "groco_multicrop": 4, "nt_xent_all_combinations": 3}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 8))  # no BatchNorm: BN would differ


def make_views(n_views: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2 * BATCH, DIM, generator=gen)
    return [base + 0.5 * torch.randn(2 * BATCH, DIM, generator=gen) for _ in range(n_views)]


def one_step(model: nn.Module, loss_fn: nn.Module, views: list[torch.Tensor]) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss, _ = loss_fn([model(v) for v in views])
    loss.backward()
    optimizer.step()
    return loss.item()


def distributed_steps(rank: int, world: int, out: str) -> None:
    """One step of every loss in LOSSES on this process's part of the batch, each from a fresh model;
    and the seeds that the processes resolve for `seed: null` and `seed: 7`."""
    seeds = [None] * world
    dist.all_gather_object(seeds, (resolve_seed(None), resolve_seed(7)))
    results = {"seeds": seeds}
    for name in sorted(LOSSES):
        model = nn.parallel.DistributedDataParallel(make_model())
        views = [v[rank * BATCH:(rank + 1) * BATCH] for v in make_views(VIEWS.get(name, 2))]
        loss = one_step(model, LOSSES[name](True), views)
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        results[name] = {"losses": losses, "params": [p.detach() for p in model.module.parameters()]}
        # each DDP model freed before the process group, as train.py does: the other order can hang
        # at exit
        del model
    if rank == 0:
        torch.save(results, out)


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        distributed_steps(rank, world, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> dict:
    """Every loss's step on two processes, and their seeds, from one launch."""
    out = tmp_path_factory.mktemp("two") / "two.pt"
    # not "fork": forking a process whose OpenMP threads have run can hang the child. The forkserver
    # (where nothing computes) imports this module once and forks the processes from it, instead of
    # each process importing it (torch, torchvision, train.py: seconds apiece); it only applies
    # when this test process starts its forkserver here.
    multiprocessing.set_forkserver_preload([__name__])
    mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, start_method="forkserver")
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_two_processes_equal_one_process_on_the_combined_batch(two_process_steps, name):
    two = two_process_steps[name]
    single = make_model()
    loss = one_step(single, LOSSES[name](False), make_views(VIEWS.get(name, 2)))
    assert sum(two["losses"]) / 2 == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for p_two, p_one in zip(two["params"], single.parameters()):
        torch.testing.assert_close(p_two, p_one.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_agree_on_a_drawn_seed(two_process_steps):
    """seed: null: rank 0 draws the seed and every process takes it (it orders the data: with a seed
    of their own, the processes' parts of an epoch overlapped and left samples out)."""
    seeds = two_process_steps["seeds"]
    assert len(seeds) == 2 and len(set(seeds)) == 1 and seeds[0][1] == 7


def test_distributed_without_a_launcher_is_an_error(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError, match="--distributed needs a launcher: set RANK and WORLD_SIZE"):
        init_process(True, 2, "env://", "cpu", None)


def test_slurm_variables_are_read(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError, match="--world-size 2 but the launcher started 3 processes"):
        init_process(True, 2, "env://", "cpu", None)
    with pytest.raises(LaunchError, match="needs MASTER_ADDR and MASTER_PORT"):
        init_process(True, 3, "env://", "cpu", None)


@pytest.mark.slow
def test_torchrun_two_processes_on_the_cpu(tmp_path):
    """The README's torchrun command on the quickstart (the TINY model at width 16: at width 8 its
    untrained k-NN, 0.51, sits on the 0.5 bound): one run folder, results from rank 0. With --mlflow
    and --tensorboard where their packages are installed (tests/test_trackers.py): one MLflow run and
    one set of event files, written by rank 0 alone, holding metrics.jsonl."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)  # the store under save_dir
    trackers = [flag for flag, have in (("--mlflow", HAVE_MLFLOW), ("--tensorboard", HAVE_TENSORBOARD)) if have]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--distributed", "--world-size", "2", "--config", str(QUICKSTART), *TINY, "encoder.args.width=16",
           "--epochs", "1", "evaluator.0.args.apply_evaluator_per_epoch=1", "trainer.log_step=1",
           f"save_dir={tmp_path}", "--results-json", str(tmp_path / "results.json"),
           *trackers]  # log_step 1: the trackers take every step
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run_dir(tmp_path, "quickstart")
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.5 < results["initial"]["knn@20_online"] <= 1.0  # k-NN over features of both processes
    assert 0.5 < results["final"]["knn@20_online"] <= 1.0
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert [s["step"] for s in steps] == list(range(5))  # global batch 256 = 2 x 128: 5 steps
    assert "[rank 1]" not in (run / "train.log").read_text()  # rank 1 logs warnings only, to its stderr
    assert "BatchNorm statistics stay per process" in done.stderr
    if HAVE_MLFLOW or HAVE_TENSORBOARD:
        from .test_trackers import _expected

        expected = _expected(run)
    if HAVE_MLFLOW:
        from .test_trackers import _assert_same, _mlflow_history, _mlflow_runs

        # the k-NN accuracy as epoch/knn_20_online: MLflow refuses "@" in a name
        in_mlflow = {mlflow_name(k): points for k, points in expected.items()}
        client, runs = _mlflow_runs(tmp_path)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["world_size"] == "2"
        assert set(runs[0].data.metrics) == set(in_mlflow) and "epoch/knn_20_online" in in_mlflow
        _assert_same({k: _mlflow_history(client, runs[0].info.run_id, k) for k in in_mlflow}, in_mlflow)
    if HAVE_TENSORBOARD:
        from .test_trackers import _tensorboard_scalars

        events = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].parent == run.relative_to(tmp_path), events
        _assert_same(_tensorboard_scalars(run), expected, rel=1e-6)


@pytest.mark.compile
@pytest.mark.slow
def test_torchrun_with_compile_trains_like_eager(tmp_path):
    """trainer.compile under DDP (torch.compile splits the graph at DDP's gradient buckets): two
    torchrun processes give the step losses of the same run uncompiled (two forked processes: its
    launch is not under test). In the CUDA-graph mode, 128 images a process: the model's graphs are
    then `test_compile_computes_the_same`'s, in inductor's cache when it ran first; the loss's, which
    gather across processes, are compiled here. PyTorch's warning 'Grad strides do not match bucket
    view strides' for the 1x1 convolutions is a false alarm (README)."""
    args = ["--config", QUICKSTART, "--epochs", "1", "evaluator=null", "trainer.init_val=false", *TINY, *GENTLE_LR]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--distributed", "--world-size", "2", *map(str, args), "trainer.compile=reduce-overhead",
           f"save_dir={tmp_path / 'compiled'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fork_ranks([*args, f"save_dir={tmp_path / 'eager'}"]) == [0, 0]
    losses = {mode: [json.loads(line)["loss"] for line in open(only_run_dir(tmp_path / mode, "quickstart") /
                                                                  "metrics.jsonl") if '"loss"' in line]
              for mode in ("eager", "compiled")}
    # The loss after one update tells a wrong gradient (a doubled one would move it by about 0.5%);
    # later steps drift apart by up to 0.06% (float rounding).
    eager, compiled = losses["eager"], losses["compiled"]
    assert len(compiled) == 5 and compiled[:2] == pytest.approx(eager[:2], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-3)


def _launch_pair(argv: list[str], port: int, **extra_env: str) -> list[subprocess.Popen]:
    """Two train.py processes started the way srun starts them on one node (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID)."""
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env.pop("SLURM_JOB_ID", None)  # no requeue unless asked
        env.update(extra_env)
        procs.append(subprocess.Popen([sys.executable, "train.py", "--distributed", "--world-size", "2", *argv],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], codes: tuple[int, int] = (0, 0)) -> list[str]:
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == list(codes), errs[0][-2000:] + errs[1][-2000:]
    return errs


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SLURM's SIGUSR1 to rank 1 only: both ranks stop after the same step (the stop flag is
    all-reduced), rank 0 saves, the job is requeued once, by rank 0, after the checkpoint is on disk
    (a stand-in `scontrol` records the checkpoint's mtime when called), and resuming with two
    processes ends with the weights of an uninterrupted run (TINY model)."""
    base = ["--config", str(QUICKSTART), *TINY, "--epochs", "3", "trainer.log_step=1", "evaluator=null",
            "trainer.init_val=false"]
    stopped, calls = tmp_path / "stopped", tmp_path / "scontrol.log"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!{sys.executable}\nimport glob, os, sys\n"
                        f"ckpt = glob.glob('{stopped}/models/quickstart/*/latest_model.pth')[0]\n"
                        f"open('{calls}', 'a').write(' '.join(sys.argv[1:]) + f' {{os.stat(ckpt).st_mtime_ns}}\\n')\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}"}
    procs = _launch_pair([*base, f"save_dir={stopped}"], free_port(), **slurm)
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        logs = list(stopped.glob("models/quickstart/*/metrics.jsonl"))
        if logs and sum('"loss"' in line for line in open(logs[0])) >= 7:
            procs[1].send_signal(signal.SIGUSR1)
            break
        time.sleep(0.05)
    errs = _wait(procs, (128 + signal.SIGUSR1,) * 2)  # rank 0 too, stopped by rank 1's signal
    assert "received SIGUSR1" in errs[1] and all("stopped by SIGUSR1" in err for err in errs)
    run = only_run_dir(stopped, "quickstart")
    ckpt = load_checkpoint(run / "latest_model.pth")
    assert 0 < ckpt["epoch_step"] < 5 and ckpt["step"] < 15
    assert calls.read_text().splitlines() == [f"requeue 4242 {(run / 'latest_model.pth').stat().st_mtime_ns}"]

    # the resumed and the uninterrupted runs: two forked processes (their launch is not under test)
    assert fork_ranks(["--resume", run / "latest_model.pth"]) == [0, 0]
    straight = tmp_path / "straight"
    assert fork_ranks([*base, f"save_dir={straight}"]) == [0, 0]
    a = load_checkpoint(run / "latest_model.pth")
    b = load_checkpoint(only_run_dir(straight, "quickstart") / "latest_model.pth")
    assert a["step"] == b["step"] == 15
    for part in ("encoder", "projection"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"


@pytest.mark.slow
def test_two_processes_log_the_loss_of_the_global_batch(tmp_path, trained_run):
    """A process's loss is the mean over its half of the global batch; the step's logged loss (and
    the epoch's train_loss) is the whole batch's, as one process on it logs, not rank 0's half.
    Checked at the first step of a two-process resume, recomputed here from the checkpoint: each
    half through the model on its own (BatchNorm statistics stay per process on the CPU), the
    loss on the two halves together."""
    run = copy_run(trained_run, tmp_path)  # one epoch of the TINY model, every step logged
    checkpoint = load_checkpoint(run / "latest_model.pth")
    assert fork_ranks(["--resume", run / "latest_model.pth", "--epochs", "2"]) == [0, 0]
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    logged = [s for s in steps if s["epoch"] == 1]

    exp = validate(apply_overrides(load_config(QUICKSTART), TINY), world_size=2, training=True)
    net = build_model(exp, ProcessInfo())
    load_module_state(net.encoder, checkpoint["encoder"], "encoder")
    load_module_state(net.projection, checkpoint["projection"], "projection")
    net.train()
    halves = []
    for rank in range(2):
        loader = build_loader(exp.train_dataloader, LoaderRuntime(rank, 2, checkpoint["data_seed"]))
        loader.set_epoch(1)
        views, _ = next(iter(loader))
        with torch.no_grad():
            halves.append(net(views))
    loss, info = build_loss(exp, ProcessInfo())([torch.cat(pair) for pair in zip(*halves)])
    assert len(logged) == 5 and logged[0]["step"] == 5
    assert logged[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged[0]["info_pos_neg_dist"] == pytest.approx(info["info_pos_neg_dist"].item(), rel=1e-4, abs=1e-6)
    epoch = next(json.loads(line) for line in open(run / "metrics.jsonl") if '"train_loss"' in line
                 and json.loads(line)["epoch"] == 1)
    assert epoch["train_loss"] == pytest.approx(sum(s["loss"] for s in logged) / 5)
