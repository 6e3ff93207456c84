"""CUDA paths: the loss on the GPU, and training with float16 (+ loss scaler) and bfloat16.
Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`."""

import json

import pytest
import torch

from model.loss import GroCo, NTXent, NTXentWithMoreNegatives
from trainer.checkpoint import load_checkpoint

from .conftest import QUICKSTART, only_run_dir, run_eval, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("n_views,n_pos", [(2, 2), (8, 2)])
def test_groco_on_cuda_equals_cpu(n_views, n_pos):
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(64, 128, generator=gen) for _ in range(n_views)]
    loss_fn = GroCo(n_augs=n_views, n_pos_augs=n_pos)
    cpu = [v.clone().requires_grad_() for v in views]
    gpu = [v.cuda().requires_grad_() for v in views]
    loss_cpu, loss_gpu = loss_fn(cpu)[0], loss_fn(gpu)[0]
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-6)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-6)


def test_groco_under_autocast_computes_in_float32():
    views = [torch.randn(32, 64, device="cuda", dtype=torch.float16) for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.float16):
        loss, info = GroCo(n_augs=2)(views)
    assert loss.dtype == torch.float32 and info["info_pos_max"].dtype == torch.float32


@pytest.mark.parametrize("precision", ["true", "bf16"])
def test_quickstart_trains_on_cuda_in_mixed_precision(tmp_path, precision):
    results = tmp_path / "results.json"
    code = run_train("--config", QUICKSTART, f"save_dir={tmp_path}", f"trainer.mixed_precision={precision}",
                     "--epochs", "10", "evaluator.0.args.apply_evaluator_per_epoch=10", "--results-json", results)
    assert code == 0
    metrics = json.loads(results.read_text())
    assert metrics["final"]["knn@20_online"] > metrics["initial"]["knn@20_online"] + 0.08
    run = only_run_dir(tmp_path, "quickstart")
    # the online k-NN extracts float32 features, as eval.py does on the checkpoint: the two agree
    # (within a digit of the 500: cuDNN may pick other kernels in the second process)
    assert run_eval("--resume", run / "latest_model.pth", "--results-json", tmp_path / "eval.json") == 0
    offline = json.loads((tmp_path / "eval.json").read_text())["final"]["knn@20_online"]
    assert offline == pytest.approx(metrics["final"]["knn@20_online"], abs=0.0021)
    ckpt = load_checkpoint(run / "latest_model.pth")
    scaler = ckpt["scaler"]
    if precision == "true":
        assert scaler["scale"] > 0  # an enabled float16 scaler keeps its state
    else:
        assert scaler == {}  # bf16 needs no scaler


def _never_waits(loss_fn, views: list[torch.Tensor], calls: int = 1) -> torch.Tensor:
    """Call `loss_fn` on `views` (and backward) `calls` times to warm it up, then once with any host
    synchronisation raising an error; returns that loss."""
    for _ in range(calls):
        torch.compiler.cudagraph_mark_step_begin()
        loss_fn(views)[0].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(views)[0]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return loss


@pytest.mark.parametrize("stop_grad", [True, False])
def test_groco_never_waits_for_the_gpu(stop_grad):
    """No host synchronisation in the loss's forward or backward (after a first call, which makes the
    sorting network's wiring)."""
    views = [torch.randn(256, 2048, device="cuda", requires_grad=True) for _ in range(8)]
    loss = _never_waits(GroCo(n_augs=8, n_pos_augs=2, stop_grad=stop_grad), views)
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_groco_never_waits_for_the_gpu(mode):
    """Compiled (and replayed as a CUDA graph with reduce-overhead), after three warm-up calls: no
    host synchronisation inside the loss's graphs."""
    views = [torch.randn(256, 2048, device="cuda", requires_grad=True) for _ in range(2)]
    loss = _never_waits(torch.compile(GroCo(n_augs=2), mode=mode), views, calls=3)
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("loss_fn", [NTXent(topk_neg=5), NTXent(stop_grad=True), NTXentWithMoreNegatives(n_augs=4)],
                         ids=["topk", "stop_grad", "more_negatives"])
def test_nt_xent_never_waits_for_the_gpu(loss_fn):
    views = [torch.randn(256, 128, device="cuda", requires_grad=True) for _ in range(4)]
    assert torch.isfinite(_never_waits(loss_fn, views)).item()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_groco_on_cuda_equals_eager(mode):
    """torch.compile of the loss (CUDA graphs with reduce-overhead) gives the eager value and gradient,
    also on a second batch (a replay of the captured graphs)."""
    compiled = torch.compile(GroCo(n_augs=2), mode=mode)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        views = [torch.randn(256, 512, generator=gen).cuda() for _ in range(2)]
        eager_in = [v.clone().requires_grad_() for v in views]
        comp_in = [v.clone().requires_grad_() for v in views]
        torch.compiler.cudagraph_mark_step_begin()
        loss_c = compiled(comp_in)[0]
        loss_c.backward()
        loss_e = GroCo(n_augs=2)(eager_in)[0]
        loss_e.backward()
        torch.testing.assert_close(loss_c.detach().clone(), loss_e.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(eager_in, comp_in):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)


def test_quickstart_trains_with_cuda_graphs(tmp_path):
    """trainer.compile=reduce-overhead with bf16: the model and the loss replayed as CUDA graphs train
    the quickstart, and the logged step metrics are the steps' own (copied out of the graphs)."""
    results = tmp_path / "results.json"
    code = run_train("--config", QUICKSTART, f"save_dir={tmp_path}", "trainer.mixed_precision=bf16",
                     "trainer.compile=reduce-overhead", "--epochs", "10",
                     "evaluator.0.args.apply_evaluator_per_epoch=10", "--results-json", results)
    assert code == 0
    metrics = json.loads(results.read_text())
    assert metrics["final"]["knn@20_online"] > metrics["initial"]["knn@20_online"] + 0.08
    run = only_run_dir(tmp_path, "quickstart")
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 50 and len(set(losses)) > 40  # not one replayed buffer read 50 times
