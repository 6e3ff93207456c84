"""Linear probing (SPEC 6): linear heads on the frozen encoder.

Several heads (hyperparameter sets) train in parallel from one encoder pass per batch; lr =
base * batch / 256; SGD (+ LARC), cosine schedule stepped per epoch; validation features are
computed once and every validation sample counts (top-1 and top-5 over the whole set).
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
from trainer.features import extract_features
from utils.config import Block, build_block, check_dataclass
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
    settings: ProbeSettings
    model: nn.Module
    optimizer: object
    schedule: object
    lr: float


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Correct predictions among the top k logits, for each k. `logits` `[B, C]`, `target` `[B]`."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == target[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@EVALUATORS.register("LinearProbingEvaluator")
class LinearProbingEvaluator:
    """Train linear heads on frozen features; metrics `linear_prob{log_name}_val_top_1` / `_top_5`.

    Args:
        distributed: heads are DDP-wrapped (given by the program).
        hyperparams: one or more `ProbeSettings` mappings.
        num_classes: number of classes.
        mute_tqdm: hide the progress bars.
    """

    def __init__(self, distributed: bool = False, hyperparams: list[ProbeSettings] = (), num_classes: int = 1000,
                 mute_tqdm: bool = False):
        self.distributed = distributed
        self.settings = [check_dataclass(h, ProbeSettings, f"hyperparams.{i}") for i, h in enumerate(hyperparams)]
        self.num_classes = num_classes
        self.progress = not mute_tqdm

    def due(self, epoch: Optional[int]) -> bool:
        return any(self._due(s, epoch) for s in self.settings)

    @staticmethod
    def _due(settings: ProbeSettings, epoch: Optional[int]) -> bool:
        after = settings.apply_evaluator_after_epochs
        return epoch is None or after is None or epoch in after

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
        heads = [self._make_head(s, encoder.feature_dim, device) for s in self.settings if self._due(s, epoch)]
        for h in heads:
            if h.settings.batch_size != train_loader.global_batch_size:
                raise ValueError(f"linear probe '{h.settings.log_name}': batch_size {h.settings.batch_size} differs "
                                 f"from its loader's {train_loader.global_batch_size}")
        val_f, val_l = extract_features(encoder, val_loader, device, autocast, normalize=False,
                                        desc="probe val features", progress=self.progress)
        encoder.eval()
        for e in tqdm(range(max(h.settings.epochs for h in heads)), desc="linear probe", disable=not self.progress):
            active = [h for h in heads if e < h.settings.epochs]
            for h in active:
                set_learning_rate(h.optimizer, h.schedule(e, h.lr))
            train_loader.set_epoch(e)
            for views, target in tqdm(train_loader, desc=f"probe epoch {e}", leave=False, disable=not self.progress):
                with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                    feats = encoder(views[0].to(device, non_blocking=True))
                feats, target = feats.float(), target.to(device, non_blocking=True)
                for h in active:
                    loss = F.cross_entropy(h.model(feats), target)
                    h.optimizer.zero_grad()
                    loss.backward()
                    h.optimizer.step()
        results = {}
        for h in heads:
            top1, top5 = self._accuracy(h.model, val_f, val_l)
            results[f"linear_prob{h.settings.log_name}_val_top_1"] = top1
            results[f"linear_prob{h.settings.log_name}_val_top_5"] = top5
        return results

    @torch.no_grad()
    def _accuracy(self, head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 8192):
        head.eval()
        counts = [0, 0]
        for start in range(0, feats.shape[0], batch):
            logits = head(feats[start: start + batch])
            c1, c5 = topk_correct(logits, labels[start: start + batch], (1, min(5, logits.shape[1])))
            counts = [counts[0] + c1, counts[1] + c5]
        total = max(feats.shape[0], 1)
        return counts[0] / total, counts[1] / total
