"""Checkpoints: dicts of `epoch` (last finished, 0-based), `step` (optimisation steps done),
`encoder`, `projection`, `optimizer` (state dicts) and `config`, as released; ours add what an
exact continuation needs (`Trainer.state_dict`). Written atomically. Read with
`torch.load(weights_only=True)`, so a type other than tensors, plain types and `ALLOWED_TYPES` is
refused unexecuted. State dicts load strictly, with or without DDP's `module.` prefix.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.files import write_bytes_atomic

REQUIRED_KEYS = ("epoch", "encoder")
# Types `load_checkpoint` reads besides tensors and plain Python types: what a known release needs.
ALLOWED_TYPES = (argparse.Namespace,)  # the paper code's config may hold its parsed arguments

log = logging.getLogger("groco")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically; a failed write (a full disk) is a WriteError naming
    `path` and leaves no temporary file."""
    path = Path(path)
    data = io.BytesIO()  # serialised first: a failed write is then the file's OSError (a full disk
    torch.save(state, data)  # gives ENOSPC), where torch's own writer reports "unexpected pos"
    write_bytes_atomic(path, data.getbuffer())


def read_state(path: str | Path, what: str = "checkpoint") -> Any:
    """The file's contents read to the CPU with `weights_only` (nothing executed, ALLOWED_TYPES
    allowed); CheckpointError, in one line, when absent, unreadable or needing another type."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with allowing(ALLOWED_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(refusal(path, err)) from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint read to the CPU without executing anything; CheckpointError, in one line, when
    absent, unreadable, needing a type not allowed, or not a checkpoint of this project."""
    state = read_state(path)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project: it needs the keys {list(REQUIRED_KEYS)}")
    return state


def allowing(types: tuple[type, ...]) -> AbstractContextManager:
    """`types` allowed by `torch.load(weights_only=True)` inside the block (for the whole process
    where torch lacks `safe_globals`)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(list(types))
    torch.serialization.add_safe_globals(list(types))
    return nullcontext()


def refusal(path: Path, err: Exception) -> str:
    """One line for a failed `torch.load`: the type not allowed and how to convert a trusted file,
    or else the first line of torch's reason."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1].strip()
    unsafe = re.match(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe and pickles_global(path, unsafe.group(1)):
        name = unsafe.group(1)
        allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in ALLOWED_TYPES)
        return (f"{path} needs {name}, which a checkpoint may not hold (tensors, plain Python types and {allowed} "
                f"only: unpickling anything else can run code); if you trust the file, convert "
                f"it: torch.load it with weights_only=False, replace the {name} by plain types (a dict, say) and "
                f"torch.save the result (README, \"Released checkpoints and results\")")
    reason = text.splitlines()[0] if text else "empty or cut short"
    return f"{path} is not a readable checkpoint ({type(err).__name__}: {reason})"


def pickles_global(path: Path, name: str) -> bool:
    """Whether the file holds the global `name` whole, as pickle writes it ("module\\nname\\n"): a file
    cut inside a global's name makes the unpickler report a cut name, which is no type to convert."""
    module, _, attr = name.rpartition(".")
    return f"{module or 'builtins'}\n{attr}\n".encode() in path.read_bytes()


def find_latest_checkpoint(runs: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (path, contents) in the run folders under `runs`
    (`save_dir/models/<name>`), or None; the files that do not load are skipped with a warning."""
    candidates = [p for pattern in ("*/latest_model.pth", "*/checkpoint-epoch*.pth") for p in runs.glob(pattern)]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def strip_module_prefix(state_dict: dict[str, Any]) -> OrderedDict:
    """Keys `module.x` -> `x` (checkpoints saved from DDP-wrapped modules); others unchanged."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def load_module_state(module: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """Load strictly into `module` (unwrapped from DDP); CheckpointError as `check_module_state`."""
    check_module_state(module, state_dict, what)
    unwrap(module).load_state_dict(strip_module_prefix(state_dict))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def check_module_state(module: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """CheckpointError, in one line naming the missing and unexpected keys and other shapes, unless
    `state_dict` (with or without `module.`) has exactly `module`'s keys and shapes."""
    expected = unwrap(module).state_dict()
    given = strip_module_prefix(state_dict)
    problems = []
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shapes = [f"{k} {list(given[k].shape)} for {list(v.shape)}" for k, v in expected.items()
              if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != v.shape]
    for label, keys in (("missing keys", missing), ("unexpected keys", extra)):
        if keys:
            problems.append(f"{label} {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    if shapes:
        more = " ..." if len(shapes) > 5 else ""
        problems.append(f"other shapes (checkpoint for model): {', '.join(shapes[:5])}{more}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, saved_config: Any, config: dict,
                          path: str) -> None:
    """CheckpointError, in one line, unless the saved `state` fits `optimizer`: the same optimiser
    type in both configs, the same parameter groups, state tensors of their parameters' shapes."""
    saved_type = (saved_config or {}).get("optimizer", {}).get("type") if isinstance(saved_config, dict) else None
    this_type = config.get("optimizer", {}).get("type")
    if saved_type and this_type and saved_type != this_type:
        raise CheckpointError(f"{path}: its optimiser state is {saved_type}'s, and this run's optimizer.type is "
                              f"{this_type}; resume with the checkpoint's optimiser or start a new run")
    groups = state.get("param_groups", [])
    sizes, expected = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != expected:
        raise CheckpointError(f"{path}: the optimiser state has parameter groups of {sizes} parameters, this "
                              f"run's optimiser {expected}")
    params = {i: p for g, mine in zip(groups, optimizer.param_groups) for i, p in zip(g["params"], mine["params"])}
    wrong = [f"parameter {i}: {name} {tuple(v.shape)} (the parameter's: {tuple(params[i].shape)})"
             for i, entry in state.get("state", {}).items() if i in params
             for name, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape != params[i].shape]
    if wrong:
        raise CheckpointError(f"{path}: the optimiser state does not match the model: {wrong[:5]}"
                              f"{' ...' if len(wrong) > 5 else ''}")


def checkpoint_step(path: Path) -> int:
    """The `step` saved in `path`, read without loading the tensors (memory-mapped); -1 for a file
    that does not read as one of our checkpoints."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["step"])
    except Exception:  # cut short, legacy format (no mmap), not a checkpoint: not a newer one
        return -1
