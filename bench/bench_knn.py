"""k-NN search speed (docs/reference.md §6): the batched, chunked search of trainer/knn.py against a search that
classifies one query at a time over the whole bank, as the reference did.

    python -m bench.bench_knn                                    # GPU: bank 1,280,000 x 2048, 50,000 queries
    python -m bench.bench_knn --device cpu --bank 100000 --queries 2000

The features are synthetic (class centres plus noise, L2-normalised, 1000 classes), so that the
accuracies mean something. Our search keeps the bank as the evaluator does (float16 on a GPU,
float32 on the CPU); the one-at-a-time search keeps it in float32, as the reference did. The
one-at-a-time search is timed on the first --naive-queries queries and extrapolated to all of
them (the output says so). Prints seconds; no pass/fail.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trainer.knn import bank_storage, knn_correct

GPU_DEFAULTS = {"bank": 1_280_000, "queries": 50_000, "naive_queries": 500}
CPU_DEFAULTS = {"bank": 100_000, "queries": 2_000, "naive_queries": 50}


def synthetic_features(n: int, centres: torch.Tensor, noise: float, gen: torch.Generator, dtype: torch.dtype,
                       block: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised features around random class centres: `[n, D]` (`dtype`) and labels `[n]`."""
    classes, dim = centres.shape
    feats = torch.empty(n, dim, dtype=dtype, device=centres.device)
    labels = torch.randint(classes, (n,), generator=gen, device=centres.device)
    for start in range(0, n, block):
        y = labels[start: start + block]
        x = centres[y] + noise * torch.randn(len(y), dim, generator=gen, device=centres.device) / dim**0.5
        feats[start: start + block] = F.normalize(x, dim=1).to(dtype)
    return feats, labels


@torch.no_grad()
def one_query_at_a_time(queries: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                        ks: list[int], num_classes: int, temperature: float) -> dict[int, int]:
    """The reference's way: per query, all bank similarities, top max(k), weighted vote, a host
    read-back of the result. Returns correct counts per k."""
    correct = dict.fromkeys(ks, 0)
    for q, y in zip(queries, labels):
        sim, idx = (bank @ q).topk(max(ks))
        weights = (sim / temperature).exp()
        for k in ks:
            scores = torch.zeros(num_classes, device=bank.device).scatter_add_(0, bank_labels[idx[:k]], weights[:k])
            correct[k] += int(scores.argmax() == y)
    return correct


def timed(fn, device: torch.device):
    """(result, seconds) of `fn()`, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bank", type=int, help="bank size (GPU default 1,280,000; CPU 100,000)")
    p.add_argument("--queries", type=int, help="number of queries (GPU default 50,000; CPU 2,000)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, nargs="+", default=[1, 10, 20, 50])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--noise", type=float, default=5.0, help="noise norm relative to the unit class centres")
    p.add_argument("--query-batch", type=int, nargs="+", default=[1024], help="query batch sizes to time")
    p.add_argument("--bank-chunk", type=int, default=65_536, help="bank rows per matrix product")
    p.add_argument("--naive-queries", type=int, help="queries timed one at a time (GPU default 500; CPU 50)")
    p.add_argument("--cpu-search-queries", type=int, default=0,
                   help="also time compute_sim_on_cpu (float32 bank in host memory) on this many queries")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.naive_queries = min(args.naive_queries, args.queries)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    centres = F.normalize(torch.randn(args.classes, args.dim, generator=gen, device=device), dim=1)
    where, dtype = bank_storage(device, on_cpu=False)
    bank, bank_labels = synthetic_features(args.bank, centres, args.noise, gen, torch.float32)
    queries, query_labels = synthetic_features(args.queries, centres, args.noise, gen, torch.float32)
    stored = bank.to(where, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}), bank {args.bank:,} x {args.dim}, {args.queries:,} queries, k {args.k}, "
          f"torch {torch.__version__}")
    search = {"temperature": args.temperature, "bank_chunk": args.bank_chunk}
    knn_correct(queries[:64], query_labels[:64], stored, bank_labels, args.k, args.classes, **search)  # warm-up
    ours = {}
    for qb in args.query_batch:
        counts, seconds = timed(lambda qb=qb: knn_correct(queries, query_labels, stored, bank_labels, args.k,
                                                          args.classes, query_batch=qb, **search), device)
        ours[qb] = seconds
        acc = ", ".join(f"k={k} {c / args.queries:.2%}" for k, c in zip(args.k, counts.tolist()))
        print(f"batched search ({dtype} bank, query batch {qb}, bank chunk {args.bank_chunk}): {seconds:.2f} s "
              f"for {args.queries:,} queries ({args.queries / seconds:,.0f} queries/s); accuracy {acc}")
    n = args.naive_queries
    sub = queries[:n], query_labels[:n]
    naive, seconds = timed(lambda: one_query_at_a_time(*sub, bank, bank_labels, args.k, args.classes,
                                                       args.temperature), device)
    full = seconds * args.queries / n
    print(f"one query at a time (float32 bank): {seconds:.2f} s for the first {n:,} queries, extrapolated to "
          f"{args.queries:,} queries: {full:.1f} s (estimate, not measured)")
    print(f"speed-up of the batched search: {full / min(ours.values()):.1f}x")
    mine = knn_correct(*sub, stored, bank_labels, args.k, args.classes, **search).tolist()
    print("on those first queries, correct counts (batched / one at a time): "
          + ", ".join(f"k={k} {m}/{naive[k]}" for k, m in zip(args.k, mine)))
    if args.cpu_search_queries and device.type == "cuda":
        time_cpu_search(args, queries, query_labels, bank, bank_labels, search)


def time_cpu_search(args: argparse.Namespace, queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor,
                    bank_labels: torch.Tensor, search: dict) -> None:
    """compute_sim_on_cpu: the same batched search with the bank and the queries in host memory."""
    n = min(args.cpu_search_queries, args.queries)
    host = bank.cpu(), bank_labels.cpu()
    sub = queries[:n].cpu(), query_labels[:n].cpu()
    _, seconds = timed(lambda: knn_correct(*sub, *host, args.k, args.classes, query_batch=max(args.query_batch),
                                           **search), torch.device("cpu"))
    print(f"batched search on the CPU (compute_sim_on_cpu, {torch.get_num_threads()} threads): {seconds:.2f} s for "
          f"the first {n:,} queries, extrapolated to {args.queries:,}: {seconds * args.queries / n:.1f} s (estimate)")


if __name__ == "__main__":
    main()
