"""Distributed helpers: process set-up from torchrun's or SLURM's variables, gathers, reductions."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("groco")

_control_group = None  # a gloo group for control messages when the main backend is NCCL
DIST_TIMEOUT_S = 600  # --dist-timeout: how long a process waits for the others to join
WAIT_LOG_S = 60  # how often a process that waits for the others says so


class LaunchError(RuntimeError):
    """The processes cannot be set up as asked (missing launcher variables, wrong world size)."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: its rank among `world_size` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a rendezvous of processes on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launch_env() -> dict[str, int] | None:
    """Rank, world size, local rank (the process's index among those of its node) and node rank from
    torchrun (RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK) or from SLURM's srun (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID); None when neither launcher set them. Under srun the
    local rank is SLURM's own index of the task on its node, right for any placement (`-m block`
    or `-m cyclic`); the rank modulo the GPUs per node is right for block placement only."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "node_rank": int(env.get("GROUP_RANK", 0)),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "node_rank": int(env.get("SLURM_NODEID", 0)),
        }
    return None


def local_device_index(local_rank: int, visible: int) -> int:
    """The GPU, among the `visible` ones this process sees, of the process of local rank
    `local_rank`: its local rank, clamped to the last visible GPU. Where every task sees all GPUs
    of its node, local rank i takes GPU i; where a task sees only its own (srun --gpus-per-task=1,
    --gpu-bind), it takes the first of them. More processes than GPUs on a node give two processes
    one GPU, which `check_distinct_devices` reports."""
    return max(0, min(local_rank, visible - 1))


def device_slot(local_rank: int, node_rank: int, device: torch.device) -> tuple[tuple[str, ...], str]:
    """What no two processes may share, and how to name it: on CUDA the GPU itself (its host and
    UUID, the same whatever CUDA_VISIBLE_DEVICES numbers it); on the CPU, where the processes share
    the cores, the local rank on the node (host and the launcher's node rank), that is the GPU the
    process would take on a GPU node."""
    host = socket.gethostname()
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or f"index {index}")
        return (host, uuid), f"GPU {index} of {host} ({uuid})"
    return (host, str(node_rank), str(local_rank)), f"local rank {local_rank} of node {node_rank} ({host})"


def check_distinct_devices(slots: list[tuple[tuple[str, ...], str]]) -> None:
    """LaunchError in one line naming the first two ranks (list index = rank) with the same slot
    (`device_slot`): two processes that would take one GPU."""
    first: dict[tuple[str, ...], int] = {}
    for rank, (key, label) in enumerate(slots):
        key = tuple(key)
        if key in first:
            raise LaunchError(
                f"ranks {first[key]} and {rank} of {len(slots)} both take {label}: each process needs a GPU of "
                "its own (srun: --ntasks-per-node at most --gpus-per-node, or --gpus-per-task=1; torchrun: "
                "--nproc_per_node at most the GPUs of the node)"
            )
        first[key] = rank


def init_process(distributed: bool, world_size: int, dist_url: str, device: str, gpu: int | None,
                 timeout_s: float = DIST_TIMEOUT_S) -> ProcessInfo:
    """Join the process group when `distributed` (waiting at most `timeout_s` seconds for the other
    processes, see `rendezvous`); pick the device.

    NCCL on CUDA, gloo on the CPU. `--distributed` without a launcher's variables is an error,
    never a silent single-process run. Each process takes the GPU of its local rank
    (`local_device_index`); two processes that would take one GPU (on the CPU: two with one local
    rank on one node) are a LaunchError on every process, once all have joined.
    """
    use_cuda = device == "cuda" and torch.cuda.is_available()
    if not distributed:
        dev = torch.device("cuda", gpu or 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return ProcessInfo(device=dev)
    launch = launch_env()
    if launch is None:
        raise LaunchError(
            "--distributed needs a launcher: set RANK and WORLD_SIZE (torchrun does) or "
            "SLURM_PROCID and SLURM_NTASKS (srun does); neither is set"
        )
    if launch["world_size"] != world_size:
        raise LaunchError(f"--world-size {world_size} but the launcher started {launch['world_size']} processes")
    if dist_url == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LaunchError(f"--distributed with --dist-url env:// needs {' and '.join(missing)} in the environment")
    if use_cuda:
        dev = torch.device("cuda", local_device_index(launch["local_rank"], torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    store = rendezvous(dist_url, launch["rank"], launch["world_size"], timeout_s)
    # under the prefix init_process_group puts the store it makes itself: the keys it always had
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore("default_pg", store),
                            world_size=launch["world_size"], rank=launch["rank"])
    global _control_group
    # A CPU group for control messages (the stop flag every step) that never waits on the GPU.
    _control_group = dist.new_group(backend="gloo") if use_cuda else None
    # Before any NCCL communicator exists (two processes on one GPU make NCCL fail or hang), over gloo.
    slots: list = [None] * launch["world_size"]
    dist.all_gather_object(slots, device_slot(launch["local_rank"], launch["node_rank"], dev),
                           group=_control_group)
    try:
        check_distinct_devices(slots)
    except LaunchError:
        shutdown()  # every process has the same slots and stops here, with the same line
        raise
    return ProcessInfo(launch["rank"], launch["world_size"], launch["local_rank"], dev)


def rendezvous(url: str, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """Meet the other processes at `url` (what init_process_group does first), logging a warning
    every WAIT_LOG_S seconds, or every quarter of `timeout_s` when that is shorter, while they have
    not all joined; LaunchError after `timeout_s` seconds (torch rounds it up, by up to a second or
    two). The returned store keeps that timeout for its later waits; the collectives keep torch's
    default timeout (init_process_group's `timeout`, left unset)."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if url == "env://" else url
    met = threading.Event()

    def report_wait() -> None:
        start = time.monotonic()
        while not met.wait(min(WAIT_LOG_S, timeout_s / 4)):
            waited = time.monotonic() - start
            if waited < timeout_s:  # past it, torch is about to give up
                log.warning("rank %d: still waiting after %.1f s for the %d processes to join at %s; giving up at "
                            "%g s (--dist-timeout)", rank, waited, world_size, where, timeout_s)

    reporter = threading.Thread(target=report_wait, name="rendezvous-wait", daemon=True)
    reporter.start()
    try:
        store, _, _ = next(dist.rendezvous(url, rank, world_size, timeout=timedelta(seconds=timeout_s)))
    except dist.DistError as err:  # TCPStore's timeouts (DistStoreError, DistNetworkError), a port in use
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LaunchError(f"rank {rank} of {world_size}: the processes did not all join at {where} "
                          f"(--dist-timeout {timeout_s:g} s): {reason}") from None
    finally:
        met.set()
        reporter.join()
    return store


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of all processes and keeps the local slice,
    so that N processes compute the gradient one process computes on the combined batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` on each process -> `[world_size * B, ...]`, rank-major, differentiable."""
    if get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` on each process -> `[world_size * B, ...]`, rank-major (equal B on every process)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all processes (a new tensor)."""
    x = x.clone()
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over all processes (a new tensor)."""
    return all_reduce_sum(x) / get_world_size()


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (a CPU all-reduce)."""
    return bool(max_over_processes(int(flag)))


def max_over_processes(value: int) -> int:
    """The largest of the processes' `value`s, on every process (a CPU all-reduce)."""
    if get_world_size() == 1:
        return value
    shared = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=_control_group)
    return int(shared.item())


def from_main_process(value: int) -> int:
    """Rank 0's `value` on every process (a CPU broadcast)."""
    if get_world_size() == 1:
        return value
    shared = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(shared, src=0, group=_control_group)
    return int(shared.item())


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process groups of a run that ended normally. Left to the interpreter's exit, gloo's
    threads may be torn down while a peer closes its connections, and the process aborts
    ('terminate called without an active exception') after a finished run."""
    global _control_group
    if is_distributed():
        dist.destroy_process_group()
    _control_group = None
