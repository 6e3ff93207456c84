"""Random number generators: the run's seed, seeding them, and their state saved and restored."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from utils.dist import from_main_process


def resolve_seed(seed: Optional[int]) -> int:
    """The config's seed, or (`seed: null`) one drawn by rank 0 and shared: the processes must agree
    on it, as it orders the data (each process reads its part of one permutation per epoch)."""
    if seed is not None:
        return seed
    return from_main_process(random.SystemRandom().randrange(2**31))


def seed_everything(seed: int) -> None:
    """Seed the global generators (model initialisation); data randomness has its own seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random number generator's state, in types that `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
