"""Weighted k-NN evaluation (SPEC 6; Wu et al. 2018, section 3.4).

Features are L2-normalised encoder features. Per query the top max(k) cosine similarities over
the bank are found (queries in batches, the bank in chunks, so that a full ImageNet bank fits);
the class score is the sum of exp(sim / T) over the neighbours of that class among the top k
(or their count without weighting); accuracy is top-1 per k.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from tqdm import tqdm

from trainer.features import extract_features
from utils.registry import EVALUATORS

log = logging.getLogger("groco")


def topk_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 262_144
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of `queries` `[Q, F]` over `bank` `[N, F]`, scanning the bank in
    chunks of `chunk` rows. Returns (similarities `[Q, k]` descending, bank indices `[Q, k]`)."""
    best_sim = torch.full((queries.shape[0], 0), -float("inf"), device=queries.device)
    best_idx = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for start in range(0, bank.shape[0], chunk):
        part = bank[start: start + chunk].to(queries.device, non_blocking=True)
        sim = queries @ part.to(queries.dtype).T
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim, order = torch.cat((best_sim, s), 1).topk(min(k, best_sim.shape[1] + s.shape[1]), dim=1)
        best_idx = torch.cat((best_idx, i + start), 1).gather(1, order)
    return best_sim, best_idx


def knn_correct(
    query_feats: torch.Tensor, query_labels: torch.Tensor, bank_feats: torch.Tensor, bank_labels: torch.Tensor,
    ks: list[int], num_classes: int, temperature: float = 0.07, use_weighting: bool = True,
    query_batch: int = 1024, bank_chunk: int = 262_144, progress: bool = False,
) -> dict[int, int]:
    """Number of correctly classified queries for each k.

    Args:
        query_feats: `[Q, F]` normalised; query_labels: `[Q]`.
        bank_feats: `[N, F]` normalised (may live on the CPU); bank_labels: `[N]`.
        ks: the k values; the search takes max(ks) neighbours once.
    """
    max_k = max(ks)
    correct = dict.fromkeys(ks, 0)
    bank_labels = bank_labels.to(query_feats.device)
    for start in tqdm(range(0, query_feats.shape[0], query_batch), desc="k-NN", leave=False, disable=not progress):
        q = query_feats[start: start + query_batch]
        target = query_labels[start: start + query_batch]
        sim, idx = topk_neighbours(q, bank_feats, max_k, bank_chunk)
        neigh_labels = bank_labels[idx]  # [b, max_k]
        weights = (sim / temperature).exp() if use_weighting else torch.ones_like(sim)
        for k in ks:
            scores = torch.zeros(q.shape[0], num_classes, device=q.device)
            scores.scatter_add_(1, neigh_labels[:, :k], weights[:, :k])
            correct[k] += int((scores.argmax(dim=1) == target).sum())
    return correct


@EVALUATORS.register("KNNEvaluator")
class KNNEvaluator:
    """Weighted k-NN accuracy of the encoder, as configured (metric names `knn@{k}{log_name}`).

    Args:
        distributed: features are gathered from all processes (given by the program).
        num_classes: number of classes.
        k: the k values.
        temperature: T of the weights exp(sim / T).
        use_weighting: weighted votes (true) or counts.
        max_feature_bank: cap on the bank size (30,000 for the online evaluation).
        apply_evaluator_per_epoch: run after every n-th epoch during training.
        compute_sim_on_cpu: keep the bank on the CPU (for small GPUs).
        mute_tqdm: hide the progress bars.
        log_name: suffix of the metric names (`_online`, `_final`).
    """

    def __init__(self, distributed: bool = False, num_classes: int = 1000, k: list[int] = (1, 10, 20),
                 temperature: float = 0.07, use_weighting: bool = True, max_feature_bank: Optional[int] = None,
                 apply_evaluator_per_epoch: int = 1, compute_sim_on_cpu: bool = False, mute_tqdm: bool = True,
                 log_name: str = ""):
        self.distributed = distributed
        self.num_classes = num_classes
        self.ks = list(k)
        self.temperature = temperature
        self.use_weighting = use_weighting
        self.max_feature_bank = max_feature_bank
        self.every = apply_evaluator_per_epoch
        self.compute_sim_on_cpu = compute_sim_on_cpu
        self.progress = not mute_tqdm
        self.log_name = log_name

    def due(self, epoch: Optional[int]) -> bool:
        """Whether to run after `epoch` (0-based; -1 before training; None: a stand-alone evaluation)."""
        return epoch is None or epoch < 0 or (epoch + 1) % self.every == 0

    def evaluate(self, encoder, bank_loader, query_loader, device, autocast=None, epoch=None) -> dict[str, float]:
        """Extract bank and query features, then classify every query. Returns `{knn@k<log_name>: acc}`."""
        bank_f, bank_l = extract_features(encoder, bank_loader, device, autocast, self.max_feature_bank,
                                          desc="k-NN bank", progress=self.progress)
        query_f, query_l = extract_features(encoder, query_loader, device, autocast,
                                            desc="k-NN queries", progress=self.progress)
        if self.compute_sim_on_cpu:
            bank_f = bank_f.cpu()
        if bank_f.shape[0] < max(self.ks):
            raise ValueError(f"k-NN: the bank holds {bank_f.shape[0]} samples, fewer than k={max(self.ks)}")
        log.info("k-NN: bank %s, %d queries", tuple(bank_f.shape), query_f.shape[0])
        correct = knn_correct(query_f, query_l, bank_f, bank_l, self.ks, self.num_classes, self.temperature,
                              self.use_weighting, progress=self.progress)
        total = max(query_f.shape[0], 1)
        return {f"knn@{k}{self.log_name}": correct[k] / total for k in self.ks}
