"""Linear probing: linear heads trained on the frozen encoder (eval mode, no gradients), several
hyperparameter sets in parallel from one encoder pass per batch; lr = base * batch / 256, set once
per epoch. Under several processes the heads are DDP-wrapped (one global batch), and the top-1 /
top-5 counts are summed so every validation sample counts once, the last partial batch included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.projection import LinearClassifier
from trainer.checkpoint import unwrap
from trainer.features import check_labels, comm_device, extract_features
from utils.config import Block, ConfigError, build_block, check_dataclass
from utils.dist import all_reduce_mean, all_reduce_sum, get_rank
from utils.optim import LARC, set_learning_rate
from utils.registry import EVALUATORS, OPTIMIZERS, SCHEDULERS

log = logging.getLogger("groco")


@dataclasses.dataclass
class ProbeSettings:
    """One hyperparameter set of `LinearProbingEvaluator.args.hyperparams`."""

    log_name: str
    apply_evaluator_after_epochs: Optional[list[int]]
    epochs: int
    base_learning_rate: float
    batch_size: int
    optimizer: Annotated[dict, Block(OPTIMIZERS)]
    optimizer_use_larc: bool
    lr_scheduler: Annotated[dict, Block(SCHEDULERS)]


@dataclasses.dataclass
class _Head:
    """One head in training; `model` is DDP-wrapped under several processes, `lr` is the peak."""

    settings: ProbeSettings
    model: nn.Module
    optimizer: object
    schedule: object
    lr: float


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Correct predictions among the top k logits for each k: `[B, C]`, `[B]` -> `[len(ks)]` int64."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


@EVALUATORS.register("LinearProbingEvaluator")
class LinearProbingEvaluator:
    """Linear heads on frozen features (metrics `linear_prob{log_name}_val_top_1` / `_top_5`), one
    per `hyperparams` entry (`ProbeSettings`; ConfigError for none); `distributed` is set by the
    program. After `evaluate`: `last_total`, the validation samples counted over all processes, and
    `last_losses`, each head's loss per epoch (by log_name, averaged over all processes)."""

    def __init__(self, distributed: bool = False, hyperparams: list[ProbeSettings] = (), num_classes: int = 1000,
                 mute_tqdm: bool = False):
        self.distributed = distributed
        self.settings = [check_dataclass(h, ProbeSettings, f"hyperparams.{i}") for i, h in enumerate(hyperparams)]
        if not self.settings:
            raise ConfigError("LinearProbingEvaluator.hyperparams: give at least one hyperparameter set")
        self.num_classes = num_classes
        self.progress = not mute_tqdm
        self.last_total: Optional[int] = None
        self.last_losses: dict[str, list[float]] = {}

    def due(self, epoch: Optional[int]) -> bool:
        """Whether any head is to be trained after `epoch` (None: a stand-alone evaluation)."""
        return any(self._due(s, epoch) for s in self.settings)

    @staticmethod
    def _due(settings: ProbeSettings, epoch: Optional[int]) -> bool:
        after = settings.apply_evaluator_after_epochs
        return epoch is None or after is None or epoch in after

    def check_loaders(self, train_loader, val_loader) -> None:
        """ConfigError unless every head's batch is its training loader's global batch (its lr is
        scaled by it) and, under several processes, that loader shuffles (full, equal batches on
        every process, as each step all-reduces the gradients)."""
        if self.distributed and not train_loader.training:
            raise ConfigError("linear probe: with several processes its training loader (valid_dataloader with "
                              "train: true) needs shuffling (shuffle: true, or a shuffle buffer > 0 for "
                              "web_dataloader), so that every process runs the same number of full batches")
        for s in self.settings:
            if s.batch_size != train_loader.global_batch_size:
                raise ConfigError(f"linear probe '{s.log_name}': batch_size {s.batch_size} differs from its "
                                  f"training loader's batch_size {train_loader.global_batch_size}")

    def _make_head(self, settings: ProbeSettings, feature_dim: int, device: torch.device) -> _Head:
        head: nn.Module = LinearClassifier(feature_dim, self.num_classes).to(device)
        if self.distributed:
            head = nn.parallel.DistributedDataParallel(head, device_ids=[device] if device.type == "cuda" else None)
        lr = settings.base_learning_rate * settings.batch_size / 256
        optimizer = build_block(settings.optimizer, OPTIMIZERS, params=head.parameters(), lr=lr)
        if settings.optimizer_use_larc:
            optimizer = LARC(optimizer)
        return _Head(settings, head, optimizer, build_block(settings.lr_scheduler, SCHEDULERS), lr)

    def evaluate(self, encoder, train_loader, val_loader, device, autocast=None, epoch=None) -> dict[str, float]:
        """Train the heads due after `epoch` and score them on the val set; returns
        `{linear_prob<log_name>_val_top_1: acc, ..._top_5: acc}` per head, the same on every process."""
        self.check_loaders(train_loader, val_loader)
        heads = [self._make_head(s, encoder.feature_dim, device) for s in self.settings if self._due(s, epoch)]
        if not heads:
            return {}
        val_f, val_l = extract_features(encoder, val_loader, device, autocast, normalize=False,
                                        desc="probe val features", progress=self.progress, gather_all=False)
        check_labels(val_l, self.num_classes, "linear probe, val set")
        was_training = encoder.training
        encoder.eval()
        self.last_losses = {h.settings.log_name: [] for h in heads}
        try:
            for e in range(max(h.settings.epochs for h in heads)):
                self._train_epoch([h for h in heads if e < h.settings.epochs], e, encoder, train_loader, device,
                                  autocast)
        finally:
            encoder.train(was_training)
        results = {}
        for h in heads:
            top1, top5, total = self._accuracy(h.model, val_f, val_l)
            results[f"linear_prob{h.settings.log_name}_val_top_1"] = top1
            results[f"linear_prob{h.settings.log_name}_val_top_5"] = top5
            self.last_total = total
        return results

    def _train_epoch(self, heads: list[_Head], epoch: int, encoder: nn.Module, loader, device: torch.device,
                     autocast) -> None:
        """One pass over `loader`, one encoder pass per batch feeding every head; each head's mean
        loss is averaged over the processes, so the log shows the global batches' loss."""
        for h in heads:
            set_learning_rate(h.optimizer, h.schedule(epoch, h.lr))
            h.model.train()
        loader.set_epoch(epoch)
        losses = torch.zeros(len(heads), device=device)
        steps = 0
        bar = tqdm(loader, desc=f"linear probe epoch {epoch}", leave=False,
                   disable=not self.progress or get_rank() != 0, dynamic_ncols=True)
        for views, target in bar:
            check_labels(target, self.num_classes, "linear probe, training batch")  # CPU labels: no GPU wait
            with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                feats = encoder(views[0].to(device, non_blocking=True))
            feats, target = feats.float(), target.to(device, non_blocking=True)
            for i, h in enumerate(heads):
                loss = F.cross_entropy(h.model(feats), target)
                h.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                h.optimizer.step()
                losses[i] += loss.detach()
            steps += 1
        if steps == 0:
            raise RuntimeError(f"linear probe epoch {epoch}: the training loader yielded no batch")
        means = all_reduce_mean((losses / steps).to(comm_device(losses))).tolist()  # one transfer per epoch
        for h, m in zip(heads, means):
            self.last_losses[h.settings.log_name].append(m)
        log.info("linear probe epoch %d: %s", epoch, ", ".join(
            f"{h.settings.log_name or 'head'} loss {m:.4f} lr {h.optimizer.param_groups[0]['lr']:.4g}"
            for h, m in zip(heads, means)))

    @torch.no_grad()
    def _accuracy(self, head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                  batch: int = 8192) -> tuple[float, float, int]:
        """(top-1, top-5, samples counted) over this process's `feats` `[n, F]` and every other's."""
        head = unwrap(head).eval()
        ks = (1, min(5, self.num_classes))
        counts = torch.zeros(3, dtype=torch.int64, device=feats.device)
        for start in range(0, feats.shape[0], batch):
            logits = head(feats[start: start + batch])
            counts[:2] += topk_correct(logits, labels[start: start + batch], ks)
        counts[2] = feats.shape[0]
        top1, top5, total = all_reduce_sum(counts.to(comm_device(counts))).tolist()
        return (top1 / total, top5 / total, total) if total else (0.0, 0.0, 0)

