"""The benchmark scripts run (on the CPU, small) and compare like with like: the reference-style
GroCo they time against ours computes the same loss. They print figures; nothing here times."""

import re
import sys

import pytest
import torch

from bench.bench_loss import ReferenceStyleGroCo
from model.loss import GroCo

from .conftest import QUICKSTART, TINY, run_bench


@pytest.mark.parametrize("n_views,n_pos", [(2, 2), (3, 3), (8, 2)])
def test_reference_style_loss_equals_ours(n_views, n_pos):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(32, 64, generator=gen)
    views = [base + 0.5 * torch.randn(32, 64, generator=gen) for _ in range(n_views)]
    ours, _ = GroCo(n_augs=n_views, n_pos_augs=n_pos)(views)
    torch.testing.assert_close(ReferenceStyleGroCo(n_views, n_pos_augs=n_pos)(views), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_loss_prints_both_timings(monkeypatch, capsys):
    from bench import bench_loss

    out = run_bench(bench_loss.main, ["--batch", "32", "--dim", "64", "--repeats", "2", "--device", "cpu",
                                      "--views", "4", "--n-pos", "2", "--count-ops"], monkeypatch, capsys)
    assert re.search(r"batch +32: reference-style +[\d.]+ ms +ours +[\d.]+ ms +ratio [\d.]+", out), out
    counts = re.search(r"operators per call: reference-style (\d+), ours (\d+)", out)
    assert counts and int(counts[2]) > 0 and int(counts[1]) > 0, out


def test_train_throughput_synthetic_multicrop(monkeypatch, capsys):
    """Every path prints samples/s and the loss's share of its step (batch 16: the reference-style
    loss's top-10 negatives need it)."""
    from bench import train_throughput

    out = run_bench(train_throughput.main, ["--device", "cpu", "--arch", "resnet10", "--width", "8", "--batch", "16",
                                            "--steps", "1", "--warmup", "0", "--multicrop", "--sizes", "32", "16",
                                            "--compile-mode"], monkeypatch, capsys)
    assert "views [32, 32, 16, 16, 16, 16, 16, 16]" in out
    rows = [line for line in out.splitlines() if "samples/s" in line]
    assert [r.split("  ")[0] for r in rows] == ["reference-style (fp16, NCHW)", "fp16, NCHW, our loss",
                                                 "bf16, channels_last, our loss"]
    assert all(re.search(r"\d+ samples/s .* loss +-?[\d.]+% of the step", r) for r in rows), out


@pytest.mark.parametrize("modes,recipe", [(["--augment-on", "cpu"], "dino"),
                                          (["--augment-on", "gpu"], "JPEG bytes only"),
                                          (["--augment-on", "gpu", "--decode-on", "cpu"], "decoded pixels")])
def test_bench_loader_times_real_shards(modes, recipe):
    """The loader bench shards real JPEGs and times the loader; with --augment-on gpu only the
    reading and batching of the files (what the CPU still does under augment_on: gpu), and with
    --decode-on cpu their decoding too."""
    from bench import bench_loader

    rows = bench_loader.main(["--workers", "1", "--batches", "2", "--batch-size", "8", "--images", "24",
                              "--recipes", "dino", *modes])
    assert [(r["recipe"], r["workers"]) for r in rows] == [(recipe, 1)]
    assert rows[0]["samples_per_s"] > 0 and rows[0]["main_cpu_ms"] >= 0


@pytest.mark.slow
def test_train_throughput_makes_shards_for_every_worker(monkeypatch, capsys):
    """`--make-shards N --workers W` (the device script's end-to-end run) writes enough shards for W
    workers to read shards of their own, and times a path on them."""
    from bench import train_throughput

    out = run_bench(train_throughput.main, ["--device", "cpu", "--arch", "resnet10", "--width", "8", "--batch", "12",
                                            "--steps", "1", "--warmup", "0", "--short", "--compile-mode",
                                            "--make-shards", "12", "--workers", "3"], monkeypatch, capsys)
    assert re.search(r"reference-style \(fp16, NCHW\) +[\d.]+ samples/s", out), out


@pytest.mark.compile
@pytest.mark.slow
def test_syncbn_compile_probe_runs(monkeypatch, capsys):
    """The SyncBatchNorm-under-compile probe (plain BatchNorm on the CPU) trains DDP eagerly and
    compiled and reports graphs, breaks, the gradient difference and step times. At its smallest: one
    gloo process (each compiles the model; two processes under compile are the trainer's test), on
    the model, batch and mode of `test_compile_computes_the_same`, whose graphs it finds compiled."""
    from bench import syncbn_compile

    out = run_bench(syncbn_compile.main, ["--device", "cpu", "--config", str(QUICKSTART), *TINY, "--mode",
                                          "reduce-overhead", "--batch", "128", "--size", "16", "--steps", "1",
                                          "--processes", "1"], monkeypatch, capsys)
    assert re.search(r"graphs compiled: [1-9]\d*, graph breaks: \d+", out), out
    diff = re.search(r"largest gradient difference, compiled - eager: ([\d.e+-]+) of the largest gradient", out)
    assert diff and float(diff[1]) < 1e-2, out
    assert re.search(r"ms per step: eager [\d.]+, compiled [\d.]+", out), out


@pytest.mark.slow
def test_bench_gpu_augment_counts_operators(monkeypatch, capsys):
    from bench import bench_gpu_augment

    out = run_bench(lambda: bench_gpu_augment.main(sys.argv[1:]), ["--device", "cpu", "--batch-size", "4",
                                                                    "--batches", "1", "--workers", "1", "--recipes",
                                                                    "dino_multicrop", "--count-ops"],
                    monkeypatch, capsys)
    line = re.search(r"dino_multicrop \(8 views\): decode \+ augment on cpu [\d.]+ samples/s; augment only "
                     r"\(decode_on: cpu\) [\d.]+ samples/s; (\d+) operators per batch; PIL on 1 processes "
                     r"[\d.]+ samples/s", out)
    assert line and int(line[1]) > 0, out
