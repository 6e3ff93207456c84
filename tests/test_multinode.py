"""Several nodes (CPU, gloo, all on this machine): torchrun agents of a two-node job, srun's tasks
placed cyclically, the multi-node sbatch script run with a two-node job's SLURM variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.dist import (
    LaunchError,
    check_distinct_devices,
    device_slot,
    free_port,
    launch_env,
    local_device_index,
)

from .conftest import QUICKSTART, ROOT, fork_ranks, only_run_dir
from .conftest import TINY as TINY_MODEL

SCRIPT = ROOT / "scripts" / "slurm" / "groco_multinode.sbatch"
# two steps of the TINY model: the global batch 512 of 1,297 digits, 256 a process
TINY = ["--config", str(QUICKSTART), "--epochs", "1", "evaluator=null", "trainer.init_val=false", *TINY_MODEL,
        "train_dataloader.args.batch_size=512"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def step_losses(save_dir: Path) -> list[float]:
    run = only_run_dir(save_dir, "quickstart")
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]


def finish(procs: list[subprocess.Popen]) -> None:
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(err[-2000:] for err in errs)


@pytest.fixture(scope="module")
def one_agent_losses(tmp_path_factory) -> list[float]:
    """The step losses of two processes on one node, as one torchrun agent starts them (forked from
    this process, with torchrun's variables: `conftest.fork_ranks`)."""
    save_dir = tmp_path_factory.mktemp("one_agent")
    assert fork_ranks([*TINY, f"save_dir={save_dir}"]) == [0, 0]
    losses = step_losses(save_dir)
    assert len(losses) == 2
    return losses


def test_the_local_rank_under_srun_is_slurm_localid(monkeypatch):
    """srun -m cyclic, 8 tasks on 2 nodes: rank 6 is the fourth task of node 0 (the rank modulo 4
    GPUs said GPU 2)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in (("SLURM_PROCID", "6"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "3"), ("SLURM_NODEID", "0")):
        monkeypatch.setenv(var, value)
    assert launch_env() == {"rank": 6, "world_size": 8, "local_rank": 3, "node_rank": 0}
    assert local_device_index(3, 4) == 3  # every task sees the node's 4 GPUs
    assert local_device_index(3, 1) == 0  # --gpus-per-task=1 or --gpu-bind: its own GPU only
    assert local_device_index(5, 4) == 3  # more tasks than GPUs: two on GPU 3, which the check finds


def test_two_processes_on_one_device_are_named():
    """The slots of the processes of a 2 x 2 job (rank i at list index i) pass; a third task that
    SLURM numbered local rank 0 on node 0 again is one line naming rank 0 and it."""
    cyclic = [device_slot(0, 0, CPU), device_slot(0, 1, CPU), device_slot(1, 0, CPU), device_slot(1, 1, CPU)]
    check_distinct_devices(cyclic)
    with pytest.raises(LaunchError) as err:
        check_distinct_devices([*cyclic, device_slot(0, 0, CPU)])
    message = str(err.value)
    assert message.startswith(f"ranks 0 and 4 of 5 both take local rank 0 of node 0 ({socket.gethostname()}):")
    assert "\n" not in message


# One srun task: the process set-up of train.py, then its rank and local rank, or the LaunchError's line.
TASK = """
import json
from utils.dist import LaunchError, init_process, shutdown
try:
    proc = init_process(True, {world}, "env://", "cpu", None, timeout_s=120)
except LaunchError as err:
    print(err)
else:
    print(json.dumps([proc.rank, proc.local_rank]))
    shutdown()
"""


def run_tasks(tasks: list[dict[str, str]]) -> list[str]:
    """The tasks started as srun starts them, each with its SLURM variables; what each printed."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TASK.format(world=len(tasks))], cwd=ROOT, text=True,
                              env=clean_env(**task, SLURM_NTASKS=str(len(tasks)), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for task in tasks]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(err[-2000:] for _, err in outs)
    return [out.strip() for out, _ in outs]


def slurm_task(procid: int, nodeid: int, localid: int) -> dict[str, str]:
    return {"SLURM_PROCID": str(procid), "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid)}


@pytest.mark.slow
def test_srun_tasks_placed_cyclically_take_slurm_localid():
    """srun -m cyclic, 3 tasks on 2 nodes, the variables as SLURM sets them: ranks 0 and 2 on node
    0, rank 1 on node 1. Each process's local rank is its SLURM_LOCALID (not the rank modulo the
    GPUs: 0 for every rank on the CPU), and they join. Then two tasks of one node with one
    SLURM_LOCALID: both stop with the line naming both ranks."""
    cyclic = [slurm_task(rank, rank % 2, rank // 2) for rank in range(3)]
    assert [json.loads(out) for out in run_tasks(cyclic)] == [[0, 0], [1, 0], [2, 1]]
    for out in run_tasks([slurm_task(0, 0, 0), slurm_task(1, 0, 0)]):
        assert out.startswith("ranks 0 and 1 of 2 both take local rank 0 of node 0"), out
        assert "\n" not in out


@pytest.mark.slow
def test_torchrun_two_nodes_give_the_losses_of_one_node(tmp_path, one_agent_losses):
    """The README's torchrun command for each node, both nodes here (127.0.0.1), one process each."""
    port = free_port()
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
               "--distributed", "--world-size", "2", *TINY, f"save_dir={tmp_path}"]
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True))
    finish(agents)
    assert step_losses(tmp_path) == pytest.approx(one_agent_losses, rel=1e-6)


def test_the_multinode_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# Stand-ins for SLURM on this machine: `scontrol show hostnames` of a comma-separated node list, and
# `srun` starting its command once per task with the variables srun gives a task (block placement).
SCONTROL = """
import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(sys.argv[3].split(",")))
"""
SRUN = """
import json, os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
nodes, tasks = int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ["SLURM_NTASKS"])
per_node = tasks // nodes
seen = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
open(os.path.join(os.path.dirname(__file__), "srun.json"), "w").write(json.dumps({**seen, "argv": args}))
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(t), "SLURM_NODEID": str(t // per_node),
                                     "SLURM_LOCALID": str(t % per_node), "SLURM_STEP_NUM_TASKS": str(tasks)})
         for t in range(tasks)]
sys.exit(max(p.wait() for p in procs))
"""


def port_of_a_job() -> int:
    """A SLURM_JOB_ID whose port in the script (20000 + id % 20000) is free here."""
    for job in range(1000 + os.getpid() % 9000, 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port in 20000-39999")


@pytest.mark.slow
def test_the_multinode_script_starts_a_process_on_each_node(tmp_path, one_agent_losses):
    """The script with the SLURM variables of a two-node job, one task a node, set by hand: its srun
    line starts two processes, with MASTER_ADDR the job's first node and MASTER_PORT from the job
    id, that train as one agent with two processes does."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, code in (("scontrol", SCONTROL), ("srun", SRUN)):
        (shims / name).write_text(f"#!{sys.executable}{code}")
        (shims / name).chmod(0o755)
    job = port_of_a_job()
    env = clean_env(SLURM_JOB_ID=str(job), SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_JOB_NUM_NODES="2",
                    SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1",
                    SLURM_SUBMIT_DIR=str(ROOT),
                    PATH=os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]]))
    logs = ROOT / "output" / "slurm"  # the script makes it, where SLURM writes the job's output
    made = [d for d in (logs.parent, logs) if not d.exists()]
    save_dir = tmp_path / "out"
    try:
        done = subprocess.run(["bash", str(SCRIPT), str(QUICKSTART), *TINY[2:], f"save_dir={save_dir}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        for d in reversed(made):
            if d.exists() and not any(d.iterdir()):
                d.rmdir()
    assert done.returncode == 0, done.stderr[-4000:]
    srun = json.loads((shims / "srun.json").read_text())
    assert (srun["MASTER_ADDR"], srun["MASTER_PORT"], srun["WORLD_SIZE"]) == ("localhost", str(20000 + job), "2")
    assert srun["argv"][:6] == ["python", "train.py", "--distributed", "--world-size", "2", "--config"]
    assert step_losses(save_dir) == pytest.approx(one_agent_losses, rel=1e-6)
