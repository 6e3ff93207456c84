"""Weighted k-NN evaluation (SPEC 6; Wu et al. 2018, section 3.4).

Features are L2-normalised encoder features. For query q the top max(k) cosine similarities s_i
over the bank are found; the score of class c is the sum of exp(s_i / T) over the neighbours of
class c among the top k (their count without weighting), and the prediction is the class of the
highest score (ties go to the lower class index). Accuracy is top-1 per k.

How it scales to ImageNet (a 1.28M x 2048 bank, 50,000 queries):
- the bank is extracted once on all processes and gathered in dataset order; it is kept in
  float16 on the GPU when the encoder runs on CUDA (5.2 GB), in float32 on the CPU otherwise or
  with `compute_sim_on_cpu` (then the search runs on the CPU, and the GPU holds only the encoder);
- queries go in batches and the bank in chunks: each chunk is converted to float32 on the fly and
  only its top max(k) per query is kept, so a search needs query_batch x bank_chunk similarities
  of memory, not queries x bank;
- each process classifies its own queries (the loaders give every val sample to exactly one
  process) and the correct counts and the query count are summed over the processes. The
  reference classified one query at a time on one GPU (bench/bench_knn.py compares the two).
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
    """Top-k cosine similarities of `queries` over `bank`, scanning the bank in chunks.

    Args:
        queries: `[Q, F]` float32, normalised, on the search device.
        bank: `[N, F]` (float16 or float32, normalised, N >= k); each chunk is moved to the
            queries' device and dtype before the product.
        k: neighbours per query.
        chunk: bank rows per matrix product.

    Returns:
        similarities `[Q, k]` (descending) and bank indices `[Q, k]` (int64).
    """
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
    """Predicted class per query for each k.

    Args:
        sim: `[Q, K]` similarities of the K = max(ks) nearest neighbours, descending.
        neighbour_labels: `[Q, K]` their labels.

    Returns:
        {k: predictions `[Q]`}; a tie between classes goes to the lower class index.
    """
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
    """Correctly classified queries for each k, on this process's queries only.

    Args:
        query_feats: `[Q, F]` normalised; query_labels: `[Q]`; both on the search device.
        bank_feats: `[N, F]` normalised (float16 or float32); bank_labels: `[N]`.
        ks: the k values; the search takes max(ks) neighbours once.

    Returns:
        counts `[len(ks)]` (int64, on the search device), in the order of `ks`.
    """
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
    """`knn_correct` on this process's queries, summed over all processes (one all-reduce).

    `search` takes knn_correct's keyword arguments (temperature, use_weighting, query_batch, ...).
    """
    local = knn_correct(query_feats, query_labels, bank_feats, bank_labels, ks, num_classes, **search)
    local = torch.cat((local, torch.tensor([query_feats.shape[0]], device=local.device)))
    summed = all_reduce_sum(local.to(comm_device(local))).tolist()
    return KNNCounts(dict(zip(ks, summed[:-1])), summed[-1])


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
        compute_sim_on_cpu: keep the bank in host memory and search on the CPU (GPU memory: the
            encoder only); otherwise the bank is float16 on the GPU.
        mute_tqdm: hide the progress bars.
        log_name: suffix of the metric names (`_online`, `_final`).
        query_batch_size: queries per search step.
        bank_chunk_size: bank rows per matrix product (memory: query_batch_size x bank_chunk_size
            float32 similarities plus one float32 chunk).

    After `evaluate`, `last_counts` holds the `KNNCounts` of that evaluation.
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
        """Extract the bank (gathered) and this process's queries, classify them, sum the counts.

        Returns `{knn@k<log_name>: top-1 accuracy}` for each k, the same on every process.
        """
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
