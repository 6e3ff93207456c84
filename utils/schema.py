"""The schema of an experiment config and its derived values. Key names and nesting are the
reference code's, so the paper's configs and the released checkpoints' `config.yaml` load unchanged."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal, Optional, Union

from utils.config import Block, ConfigError, check_dataclass
from utils.registry import (
    DATALOADERS,
    ENCODERS,
    EVALUATORS,
    LOSSES,
    OPTIMIZERS,
    PROJECTIONS,
)

LoaderBlock = Annotated[dict, Block(DATALOADERS)]
EvaluatorBlock = Annotated[dict, Block(EVALUATORS)]


# torch.compile modes that replay the compiled code as CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclasses.dataclass
class TrainerSettings:
    """The `trainer` block.

    `mixed_precision`: false = float32; true or 'fp16' = float16 autocast with a loss scaler (the
    paper's; CUDA only); 'bf16' = bfloat16, no scaler; the CPU always runs float32 (logged).
    `channels_last`: NHWC images and weights. `compile`: torch.compile of model and loss, true = the
    default mode; 'reduce-overhead' and 'max-autotune' also replay CUDA graphs, removing the launch
    cost that dominates the small GroCo loss. Neither changes results beyond rounding.
    """

    epochs: int
    mixed_precision: Union[bool, Literal["fp16", "bf16"]] = False
    init_val: bool = False
    save_latest: bool = True
    save_period: Optional[int] = None
    log_step: int = 50
    clip_grad: Optional[float] = None
    channels_last: bool = False
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = False


@dataclasses.dataclass
class ExperimentConfig:
    """The whole config. Training needs the model, loss, optimiser and trainer blocks; an
    evaluation config (`eval_knn.yaml`) may hold only `valid_dataloader` and `evaluator`."""

    train_dataloader: Optional[LoaderBlock] = None
    valid_dataloader: Union[LoaderBlock, list[LoaderBlock], None] = None
    encoder: Optional[Annotated[dict, Block(ENCODERS)]] = None
    projection: Optional[Annotated[dict, Block(PROJECTIONS)]] = None
    loss: Optional[Annotated[dict, Block(LOSSES)]] = None
    learning_rate_scaling: Literal["linear", "sqrt", "none"] = "linear"
    base_learning_rate: Optional[float] = None
    optimizer_use_larc: bool = False
    warmup_epochs: float = 0.0
    optimizer: Optional[Annotated[dict, Block(OPTIMIZERS)]] = None
    trainer: Optional[TrainerSettings] = None
    seed: Optional[int] = None
    save_dir: str = "./output"
    evaluator: Union[EvaluatorBlock, list[EvaluatorBlock], None] = None
    name: Optional[str] = None


TRAINING_KEYS = ("train_dataloader", "encoder", "projection", "loss", "base_learning_rate", "optimizer", "trainer")


def validate(config: dict, world_size: int = 1, training: bool = True) -> ExperimentConfig:
    """Check the whole config; return it as an `ExperimentConfig`.

    Besides the types: a training config must have every block training needs; the schedule's
    values must be in range (`check_schedule`); and every loader's batch (the global batch, as in
    the paper's configs) must be positive and divide by `world_size`.
    """
    exp = check_dataclass(config, ExperimentConfig, "")
    if training:
        missing = [k for k in TRAINING_KEYS if getattr(exp, k) is None]
        if missing:
            raise ConfigError(f"{missing[0]}: required for training but missing from the config")
    elif exp.encoder is None:
        raise ConfigError("encoder: required to build the model but missing from the config")
    check_schedule(exp)
    for path, block in loader_blocks(exp):
        batch = (block.get("args") or {}).get("batch_size")
        if isinstance(batch, int) and batch < 1:
            raise ConfigError(f"{path}.args.batch_size: {batch}; a batch holds at least one sample")
        if isinstance(batch, int) and batch % world_size != 0:
            raise ConfigError(
                f"{path}.args.batch_size: {batch} (the global batch) does not divide "
                f"by the {world_size} processes"
            )
    return exp


def check_schedule(exp: ExperimentConfig) -> None:
    """Values that type-check but make no schedule: fewer than one epoch (total steps <= 0), a
    warm-up below 0 or longer than the run, a learning rate of 0 or below."""
    if exp.trainer is not None and exp.trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs: {exp.trainer.epochs} (also set by --epochs); training needs at least 1 "
                          f"epoch")
    if not exp.warmup_epochs >= 0:
        raise ConfigError(f"warmup_epochs: {exp.warmup_epochs:g}; warm-up lasts 0 epochs or more")
    if exp.trainer is not None and exp.warmup_epochs > exp.trainer.epochs:
        raise ConfigError(f"warmup_epochs: {exp.warmup_epochs:g} is more than the {exp.trainer.epochs} epoch(s) of "
                          f"trainer.epochs (also set by --epochs); the warm-up ends within the run")
    if exp.base_learning_rate is not None and not exp.base_learning_rate > 0:
        raise ConfigError(f"base_learning_rate: {exp.base_learning_rate:g}; a learning rate must be positive")


def loader_blocks(exp: ExperimentConfig) -> list[tuple[str, dict]]:
    """All dataloader blocks with their key paths."""
    blocks = []
    if exp.train_dataloader is not None:
        blocks.append(("train_dataloader", exp.train_dataloader))
    valid = exp.valid_dataloader
    if isinstance(valid, dict):
        blocks.append(("valid_dataloader", valid))
    elif isinstance(valid, list):
        blocks += [(f"valid_dataloader.{i}", b) for i, b in enumerate(valid)]
    return blocks


def as_list(value: Union[dict, list, None]) -> list:
    """A block or a list of blocks as a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def scaled_learning_rate(base: float, rule: str, global_batch: int) -> float:
    """Peak lr for global batch B: `linear` base * 32 * B / 1024, `sqrt` base * sqrt(B), `none` base."""
    if rule == "linear":
        return base * 32.0 * global_batch / 1024
    if rule == "sqrt":
        return base * math.sqrt(global_batch)
    if rule == "none":
        return base
    raise ConfigError(f"learning_rate_scaling: {rule!r} is not one of ['linear', 'sqrt', 'none']")
