"""Build the parts a config names (model, loss, optimiser, loaders, evaluators) and the values
training derives from it (per-process batch, scaled learning rate, steps)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

import data_loader  # noqa: F401  (registers the loader types)
import model  # noqa: F401  (registers the model and loss types)
import trainer.knn  # noqa: F401  (registers KNNEvaluator)
import trainer.linear_probe  # noqa: F401  (registers LinearProbingEvaluator)
from data_loader.base import DataError, LoaderRuntime, check_data
from model.projection import SSLModel
from trainer.trainer import Evaluation
from utils.config import ConfigError, build_block
from utils.dist import ProcessInfo
from utils.optim import LARC
from utils.registry import DATALOADERS, ENCODERS, EVALUATORS, LOSSES, OPTIMIZERS, PROJECTIONS
from utils.schema import ExperimentConfig, as_list, scaled_learning_rate

log = logging.getLogger("groco")


def derived_values(exp: ExperimentConfig, world_size: int, steps_per_epoch: Optional[int]) -> dict:
    """The values training derives from the config, saved as config.yaml's `derived`; the step
    counts are None when `steps_per_epoch` is (a dry run without data)."""
    global_batch = exp.train_dataloader["args"]["batch_size"]
    derived = {
        "learning_rate": scaled_learning_rate(exp.base_learning_rate, exp.learning_rate_scaling, global_batch),
        "global_batch_size": global_batch,
        "batch_size_per_process": global_batch // world_size,
        "world_size": world_size,
        "epochs": exp.trainer.epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": None,
        "warmup_steps": None,
        "loss": exp.loss["type"],
    }
    if steps_per_epoch is not None:
        derived["total_steps"] = exp.trainer.epochs * steps_per_epoch
        derived["warmup_steps"] = round(exp.warmup_epochs * steps_per_epoch)
    return derived


def build_encoder(exp: ExperimentConfig) -> nn.Module:
    return build_block(exp.encoder, ENCODERS)


def build_network(exp: ExperimentConfig) -> SSLModel:
    """Encoder + head of the config, on the CPU, in float32."""
    encoder = build_encoder(exp)
    return SSLModel(encoder, build_block(exp.projection, PROJECTIONS, input_dim=encoder.feature_dim))


def build_model(exp: ExperimentConfig, proc: ProcessInfo) -> nn.Module:
    """Encoder + head on the process's device; under DDP with SyncBatchNorm on CUDA."""
    net: nn.Module = build_network(exp)
    if proc.distributed and proc.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif proc.distributed:
        log.info("gloo on the CPU: BatchNorm statistics stay per process (SyncBatchNorm needs CUDA)")
    net = net.to(proc.device)
    if exp.trainer is not None and exp.trainer.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if proc.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[proc.device] if proc.device.type == "cuda" else None)
    return net


def build_loss(exp: ExperimentConfig, proc: ProcessInfo) -> nn.Module:
    return build_block(exp.loss, LOSSES, distributed=proc.distributed).to(proc.device)


def build_optimizer(exp: ExperimentConfig, net: nn.Module, lr: float):
    """SGD (+ LARC) over every parameter that requires a gradient."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_block(exp.optimizer, OPTIMIZERS, params=params, lr=lr)
    return LARC(optimizer) if exp.optimizer_use_larc else optimizer


def build_loader(block: dict, runtime: LoaderRuntime):
    return build_block(block, DATALOADERS, runtime=runtime)


def build_evaluations(exp: ExperimentConfig, runtime: LoaderRuntime, distributed: bool) -> list[Evaluation]:
    """Evaluators with the `train: true` loader of `valid_dataloader` (k-NN bank, probe training)
    and its `train: false` one (queries, probe validation); ConfigError unless there is one each."""
    evaluators = [build_block(b, EVALUATORS, distributed=distributed) for b in as_list(exp.evaluator)]
    if not evaluators:
        return []
    blocks = as_list(exp.valid_dataloader)
    train_blocks = [b for b in blocks if (b.get("args") or {}).get("train", True)]
    val_blocks = [b for b in blocks if not (b.get("args") or {}).get("train", True)]
    if len(train_blocks) != 1 or len(val_blocks) != 1:
        raise ConfigError(
            "valid_dataloader: the evaluators need exactly one loader with `train: true` (the k-NN bank, "
            f"probe training) and one with `train: false` (the queries); got {len(train_blocks)} and {len(val_blocks)}"
        )
    train_loader, val_loader = build_loader(train_blocks[0], runtime), build_loader(val_blocks[0], runtime)
    for evaluator in evaluators:
        evaluator.check_loaders(train_loader, val_loader)  # before training, not after its last epoch
    return [Evaluation(e, train_loader, val_loader) for e in evaluators]


def check_run_data(evaluations: list[Evaluation], *loaders) -> None:
    """DataError, before a run folder is made, when the data of `loaders` or of the evaluators'
    loaders is missing, or the evaluators' has no classes or more than their `num_classes`."""
    check_data(loaders, [(loader, ev.evaluator.num_classes, f"evaluator.{i}.args.num_classes")
                         for i, ev in enumerate(evaluations) for loader in (ev.train_loader, ev.val_loader)])


def steps_per_epoch(loader, dry_run: bool = False) -> Optional[int]:
    """Steps of one epoch of the training loader, the same on every process (the last partial batch
    is dropped). ConfigError when the data fills no global batch; None in a dry run without data."""
    try:
        samples = loader.num_samples
    except DataError as err:
        if not dry_run:
            raise
        log.info("steps per epoch unknown until the data is there (%s)", err)
        return None
    batch, processes = loader.global_batch_size, loader.runtime.world_size
    if samples < batch:
        each = f"{batch // processes} on each of {processes} processes" if processes > 1 else "1 process"
        raise ConfigError(f"train_dataloader.args.batch_size: {batch} (the global batch; {each}) is more than the "
                          f"{samples} training samples: an epoch would have no step")
    return len(loader)

