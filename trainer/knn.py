"""Weighted k-NN evaluation (Wu et al. 2018, section 3.4) on L2-normalised encoder features: the
score of class c is the sum of exp(s_i / T) over the neighbours of class c among the top k cosine
similarities s_i (their count without weighting); top-1 accuracy per k.

An ImageNet bank (1.28M x 2048) is 5.2 GB in float16 on a GPU. Queries go in batches and the bank
in chunks, keeping each chunk's top max(k): memory is query_batch x bank_chunk similarities. Each
process classifies its own queries (every val sample is on one process) and the counts are summed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from tqdm import tqdm

from data_loader.base import DataError
from trainer.features import check_labels, comm_device, extract_features
from utils.config import ConfigError
from utils.dist import all_reduce_sum, get_rank
from utils.registry import EVALUATORS

log = logging.getLogger("groco")


@dataclasses.dataclass(frozen=True)
class KNNCounts:
    """Correctly classified queries per k, and the number of queries, over all processes."""

    correct: dict[int, int]
    total: int

    def accuracy(self, k: int) -> float:
        return self.correct[k] / self.total if self.total else 0.0


def bank_storage(device: torch.device, on_cpu: bool) -> tuple[torch.device, torch.dtype]:
    """Where the bank is kept and searched, and its dtype: float16 on a GPU, float32 on the CPU."""
    if on_cpu or device.type != "cuda":
        return torch.device("cpu"), torch.float32
    return device, torch.float16


def topk_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 65_536
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of `queries` `[Q, F]` (float32, normalised, on the search device)
    over `bank` `[N, F]` (normalised, N >= k), `chunk` bank rows per product, each moved to the
    queries' device and dtype. Returns similarities `[Q, k]` (descending) and indices `[Q, k]`."""
    sims, idx = [], []
    for start in range(0, bank.shape[0], chunk):
        part = bank[start: start + chunk].to(device=queries.device, dtype=queries.dtype)
        s, i = (queries @ part.T).topk(min(k, part.shape[0]), dim=1)
        sims.append(s)
        idx.append(i + start)
    best, order = torch.cat(sims, dim=1).topk(k, dim=1)
    return best, torch.cat(idx, dim=1).gather(1, order)


def vote(sim: torch.Tensor, neighbour_labels: torch.Tensor, ks: list[int], num_classes: int,
         temperature: float, use_weighting: bool) -> dict[int, torch.Tensor]:
    """{k: predicted class `[Q]`} from `sim` `[Q, K]` (the K = max(ks) nearest neighbours,
    descending) and their labels `[Q, K]`; a tie goes to the lower class index."""
    weights = (sim / temperature).exp() if use_weighting else torch.ones_like(sim)
    preds = {}
    for k in ks:
        scores = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=sim.device)
        scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        preds[k] = scores.argmax(dim=1)  # the first maximum: the lowest class index among ties
    return preds


@torch.no_grad()
def knn_correct(
    query_feats: torch.Tensor, query_labels: torch.Tensor, bank_feats: torch.Tensor, bank_labels: torch.Tensor,
    ks: list[int], num_classes: int, temperature: float = 0.07, use_weighting: bool = True,
    query_batch: int = 1024, bank_chunk: int = 65_536, progress: bool = False,
) -> torch.Tensor:
    """Correctly classified queries of this process per k: int64 `[len(ks)]` on the search device.
    `query_feats` `[Q, F]` and `query_labels` `[Q]` on the search device; `bank_feats` `[N, F]`
    (float16 or float32), `bank_labels` `[N]`; both feature sets normalised."""
    max_k = max(ks)
    device = query_feats.device
    bank_labels = bank_labels.to(device)
    correct = torch.zeros(len(ks), dtype=torch.int64, device=device)
    starts = range(0, query_feats.shape[0], query_batch)
    for start in tqdm(starts, desc="k-NN search", leave=False, disable=not progress, dynamic_ncols=True):
        q = query_feats[start: start + query_batch].float()
        target = query_labels[start: start + query_batch]
        sim, idx = topk_neighbours(q, bank_feats, max_k, bank_chunk)
        preds = vote(sim, bank_labels[idx], ks, num_classes, temperature, use_weighting)
        correct += torch.stack([(preds[k] == target).sum() for k in ks])
    return correct


def knn_counts(query_feats: torch.Tensor, query_labels: torch.Tensor, bank_feats: torch.Tensor,
               bank_labels: torch.Tensor, ks: list[int], num_classes: int, **search) -> KNNCounts:
    """`knn_correct` (its keyword arguments in `search`) summed over all processes."""
    local = knn_correct(query_feats, query_labels, bank_feats, bank_labels, ks, num_classes, **search)
    local = torch.cat((local, torch.tensor([query_feats.shape[0]], device=local.device)))
    summed = all_reduce_sum(local.to(comm_device(local))).tolist()
    return KNNCounts(dict(zip(ks, summed[:-1])), summed[-1])


@EVALUATORS.register("KNNEvaluator")
class KNNEvaluator:
    """Weighted k-NN accuracy of the encoder (metrics `knn@{k}{log_name}`); `last_counts` holds the
    last evaluation's `KNNCounts`. ConfigError for no k, or a k, batch, chunk or period below 1.

    Args:
        distributed: features are gathered from all processes (set by the program).
        temperature: T of the weights exp(sim / T); `use_weighting` false: plain counts.
        max_feature_bank: cap on the bank size (30,000 for the online evaluation).
        apply_evaluator_per_epoch: run after every n-th epoch during training.
        compute_sim_on_cpu: bank in host memory, search on the CPU; else float16 on the GPU.
        log_name: suffix of the metric names (`_online`, `_final`).
        query_batch_size, bank_chunk_size: queries per search step, bank rows per product (memory:
            their product in float32 similarities, plus one float32 chunk).
    """

    def __init__(self, distributed: bool = False, num_classes: int = 1000, k: list[int] = (1, 10, 20),
                 temperature: float = 0.07, use_weighting: bool = True, max_feature_bank: Optional[int] = None,
                 apply_evaluator_per_epoch: int = 1, compute_sim_on_cpu: bool = False, mute_tqdm: bool = True,
                 log_name: str = "", query_batch_size: int = 1024, bank_chunk_size: int = 65_536):
        if not k or min(k) < 1 or query_batch_size < 1 or bank_chunk_size < 1 or apply_evaluator_per_epoch < 1:
            raise ConfigError(f"KNNEvaluator: k {list(k)}, query_batch_size {query_batch_size}, bank_chunk_size "
                             f"{bank_chunk_size} and apply_evaluator_per_epoch {apply_evaluator_per_epoch} "
                             "must be positive")
        self.distributed = distributed
        self.num_classes = num_classes
        self.ks = sorted(set(k))
        self.temperature = temperature
        self.use_weighting = use_weighting
        self.max_feature_bank = max_feature_bank
        self.every = apply_evaluator_per_epoch
        self.compute_sim_on_cpu = compute_sim_on_cpu
        self.progress = not mute_tqdm
        self.log_name = log_name
        self.query_batch = query_batch_size
        self.bank_chunk = bank_chunk_size
        self.last_counts: Optional[KNNCounts] = None

    def due(self, epoch: Optional[int]) -> bool:
        """Whether to run after `epoch` (0-based; -1 before training; None: a stand-alone evaluation)."""
        return epoch is None or epoch < 0 or (epoch + 1) % self.every == 0

    def plan(self, device: torch.device) -> dict:
        """What an evaluation on `device` will do (for logs and dry runs)."""
        where, dtype = bank_storage(device, self.compute_sim_on_cpu)
        return {"k": self.ks, "temperature": self.temperature, "bank_device": str(where),
                "bank_dtype": str(dtype).replace("torch.", ""), "max_feature_bank": self.max_feature_bank}

    def check_loaders(self, bank_loader, query_loader) -> None:
        """Nothing to check before reading data: any bank and query loaders will do."""

    def evaluate(self, encoder, bank_loader, query_loader, device, autocast=None, epoch=None) -> dict[str, float]:
        """`{knn@k<log_name>: top-1 accuracy}` per k, the same on every process. DataError when the
        bank holds fewer than max(k) samples or a label leaves [0, num_classes)."""
        where, dtype = bank_storage(device, self.compute_sim_on_cpu)
        bank_f, bank_l = extract_features(encoder, bank_loader, device, autocast, self.max_feature_bank,
                                          desc="k-NN bank", progress=self.progress, store_device=where,
                                          store_dtype=dtype)
        query_f, query_l = extract_features(encoder, query_loader, device, autocast, desc="k-NN queries",
                                            progress=self.progress, store_device=where, gather_all=False)
        self._check_bank(bank_f, bank_l)
        check_labels(query_l, self.num_classes, "k-NN queries")
        log.info("k-NN: bank %s (%s on %s), k %s", tuple(bank_f.shape), dtype, where, self.ks)
        counts = knn_counts(query_f, query_l, bank_f, bank_l, self.ks, self.num_classes,
                            temperature=self.temperature, use_weighting=self.use_weighting,
                            query_batch=self.query_batch, bank_chunk=self.bank_chunk,
                            progress=self.progress and get_rank() == 0)
        self._check_total(counts, query_loader)
        self.last_counts = counts
        return {f"knn@{k}{self.log_name}": counts.accuracy(k) for k in self.ks}

    def _check_bank(self, bank_f: torch.Tensor, bank_l: torch.Tensor) -> None:
        if bank_f.shape[0] < max(self.ks):
            raise DataError(f"k-NN: the bank holds {bank_f.shape[0]} samples, fewer than k={max(self.ks)}")
        check_labels(bank_l, self.num_classes, "k-NN bank")  # gathered: the same on every process

    def _check_total(self, counts: KNNCounts, query_loader) -> None:
        expected = getattr(query_loader, "num_samples", None)
        log.info("k-NN: %d queries classified: %s", counts.total,
                 ", ".join(f"k={k} {c} correct" for k, c in counts.correct.items()))
        if expected is not None and expected != counts.total:
            log.warning("k-NN: %d queries were classified but the query loader declares %d samples (for "
                        "web_dataloader: its dataset_size)", counts.total, expected)
