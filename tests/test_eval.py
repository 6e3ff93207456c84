"""Evaluation (docs/reference.md §6, §7, §9): released-format checkpoints, the k-NN search against a brute-force
per-query computation, linear probing, two gloo processes counting an odd val set once, corrupt
checkpoints, the torchvision export, and eval.py's dry run on top of a training checkpoint."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.models as tvm
import yaml
from PIL import Image
from torch import nn

from data_loader.base import DataError, LoaderRuntime, balanced_part, epoch_generator, train_indices
from data_loader.folder import ImageFolderLoader
from model.encoder import ResNetEncoder
from model.projection import MLPProjection, SSLModel
from pretrained import export_torchvision
from trainer.build import build_encoder
from trainer.checkpoint import load_module_state
from trainer.cli import build_parser, resolve_config
from trainer.features import check_labels, gather_in_order
from trainer.knn import KNNEvaluator, knn_counts
from trainer.linear_probe import LinearProbingEvaluator
from utils.config import ConfigError
from utils.dist import free_port
from utils.schema import validate

from .conftest import QUICKSTART, ROOT, last_json_line, run_eval

TINY_ENCODER = {"type": "RegularEncoder", "args": {"arch": "resnet18", "width": 8}}
COLOURS = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]
N_TRAIN, N_VAL = 12, 5  # per class: 36 bank images, 15 queries (odd, so two processes split it unevenly)
KS = [1, 3, 5]


# ----------------------------------------------------------------------------- helpers


def write_image_folder(root: Path, size: int = 40, seed: int = 0) -> Path:
    """root/{train,val}/class_<c>/*.jpg: noisy images tinted by class, every one different."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array(colour) * rng.uniform(0.3, 1.0) + rng.uniform(-70, 70, 3)
                pixels = base + rng.normal(0, 60, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def folder_block(root: Path, train: bool, batch_size: int, shuffle: bool = False) -> dict:
    return {"type": "image_folder_dataloader", "args": {"root": str(root), "shuffle": shuffle, "batch_size": batch_size,
                                                        "train": train, "transform_type": "val"}}


def folder_loader(root: Path, train: bool, batch_size: int, rank: int = 0, world: int = 1,
                  shuffle: bool = False) -> ImageFolderLoader:
    return ImageFolderLoader(LoaderRuntime(rank, world, 0), str(root), shuffle=shuffle, batch_size=batch_size,
                             train=train, transform_type="val")


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial weights and running statistics, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
                m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
            m.running_mean = torch.randn(m.running_mean.shape, generator=gen) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=gen) + 0.5
            m.num_batches_tracked += 100
    return model.eval()


class DDPLike(nn.Module):
    """What DistributedDataParallel adds to the keys: the wrapped module sits in `module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def save_released(net: SSLModel, config: dict, path: Path) -> None:
    """The released format: SyncBatchNorm layers, DDP keys, the legacy serialisation."""
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    state = {
        "epoch": 99,
        "step": 125_000,
        "encoder": DDPLike(synced.encoder).state_dict(),
        "projection": DDPLike(synced.projection).state_dict(),
        "optimizer": torch.optim.SGD(synced.parameters(), lr=0.1, momentum=0.9).state_dict(),
        "config": config,
    }
    assert "module.encoder.conv1.weight" in state["encoder"] and "module.projection.0.weight" in state["projection"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)


def tiny_model(encoder_block: dict = TINY_ENCODER, seed: int = 0) -> SSLModel:
    torch.manual_seed(seed)
    encoder = build_encoder(validate({"encoder": encoder_block}, training=False))
    return trained_like(SSLModel(encoder, MLPProjection(encoder.feature_dim, num_layers=2, output_dim=16)), seed)


def run_config(encoder_block: dict = TINY_ENCODER) -> dict:
    """What a training run stores as its config (the parts evaluation reads)."""
    return {"encoder": encoder_block, "projection": {"type": "RegularProjection", "args": {"num_layers": 2,
                                                                                            "output_dim": 16}},
            "seed": 0, "name": "tiny"}


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, SSLModel]:
    """A released-format checkpoint (config inside only) and the model it came from."""
    net = tiny_model()
    path = tmp_path_factory.mktemp("released") / "latest_model.pth"
    save_released(net, run_config(), path)
    return path, net


def load_encoder_as_eval_does(ckpt: Path) -> nn.Module:
    config, checkpoint = resolve_config(build_parser("eval").parse_intermixed_args(["--resume", str(ckpt)]))
    encoder = build_encoder(validate(config, training=False))
    load_module_state(encoder, checkpoint["encoder"], str(ckpt))
    return encoder.eval()


@torch.no_grad()
def folder_features(encoder: nn.Module, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features `[N, F]` and labels `[N]` of a split, computed directly, in one process."""
    feats, labels = [], []
    for views, target in folder_loader(root, train, batch_size=64):
        feats.append(nn.functional.normalize(encoder.eval()(views[0]), dim=1))
        labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def brute_force_knn(queries: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                    ks: list[int], num_classes: int, temperature: float = 0.07, weighted: bool = True) -> dict:
    """Weighted k-NN per query, in float64 Python: sort the bank by cosine similarity, vote among the top k
    (weights exp(sim / T) or counts), the highest score wins (ties: the lower class). Correct counts per k."""
    correct = dict.fromkeys(ks, 0)
    bank64 = bank.double()
    for q, y in zip(queries.double(), labels.tolist()):
        sims = (bank64 @ q).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])
        for k in ks:
            scores = [0.0] * num_classes
            for i in order[:k]:
                scores[int(bank_labels[i])] += math.exp(sims[i] / temperature) if weighted else 1.0
            correct[k] += max(range(num_classes), key=lambda c: (scores[c], -c)) == y
    return correct


class TensorLoader:
    """An in-memory loader with the project's semantics (data_loader.base): training passes take
    each process's slice of every full global batch, evaluation passes a contiguous part once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, training: bool, rank: int = 0,
                 world: int = 1):
        self.x, self.y, self.training, self.rank, self.world = x, y, training, rank, world
        self.global_batch_size, self.batch_size = batch_size, batch_size // world
        self.num_samples, self.epoch = len(y), 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch

    def batches(self) -> list[torch.Tensor]:
        if self.training:
            gen = epoch_generator(0, self.epoch)
            return train_indices(len(self.y), self.global_batch_size, gen, self.rank, self.world, True)
        part = balanced_part(len(self.y), self.rank, self.world, round_up=True)
        return list(torch.tensor(part).split(self.batch_size))

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self):
        for index in self.batches():
            yield [self.x[index]], self.y[index]


class FeatureEncoder(nn.Module):
    """The identity: the loader yields features already."""

    def __init__(self, dim: int):
        super().__init__()
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def blobs(n: int, seed: int, classes: int = 4, dim: int = 8, spread: float = 0.5):
    """Linearly separable points: class c around 3 * e_c. `[n, dim]`, labels `[n]`."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=gen)
    return 3 * torch.eye(dim)[y] + spread * torch.randn(n, dim, generator=gen), y


def probe_settings(log_name: str, batch_size: int, epochs: int, base_lr: float, larc: bool) -> dict:
    return {"log_name": log_name, "apply_evaluator_after_epochs": None, "epochs": epochs,
            "base_learning_rate": base_lr, "batch_size": batch_size,
            "optimizer": {"type": "SGD", "args": {"momentum": 0.9, "weight_decay": 0.0}},
            "optimizer_use_larc": larc,
            "lr_scheduler": {"type": "CustomCosineSchedulerWithWarmup", "args": {"epochs": epochs,
                                                                                 "warmup_epochs": 0}}}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("config_beside", [False, True])
def test_released_checkpoint_gives_the_features_of_its_model(tmp_path, config_beside):
    """`module.` keys, SyncBatchNorm, legacy serialisation; the architecture from config.yaml beside
    the checkpoint (which wins over a stale config inside) or else from the config inside."""
    net = tiny_model(seed=1)
    ckpt = tmp_path / "2views_100ep" / "latest_model.pth"
    inside = run_config({"type": "RegularEncoder", "args": {"arch": "resnet34", "width": 8}}) if config_beside \
        else run_config()
    save_released(net, inside, ckpt)
    if config_beside:
        (ckpt.parent / "config.yaml").write_text(yaml.safe_dump(run_config()))
    with open(ckpt, "rb") as f:
        assert f.read(2) != b"PK"  # the legacy format, not a zip archive
    encoder = load_encoder_as_eval_does(ckpt)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = net.encoder.eval()(images), encoder(images)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["truncated zip", "truncated legacy", "text file", "missing keys", "no encoder"])
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, capsys, image_root, released, kind):
    ckpt = tmp_path / "bad" / "latest_model.pth"
    ckpt.parent.mkdir()
    state = {"epoch": 0, "encoder": tiny_model().encoder.state_dict(), "config": run_config()}
    if kind == "truncated zip":
        torch.save(state, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "truncated legacy":
        ckpt.write_bytes(released[0].read_bytes()[:5000])
    elif kind == "text file":
        ckpt.write_text("this is not a checkpoint\n")
    elif kind == "missing keys":
        state["encoder"] = {k: v for k, v in state["encoder"].items() if "layer4.1" not in k}
        torch.save(state, ckpt)
    else:
        torch.save({"epoch": 0, "config": run_config()}, ckpt)
    config = tmp_path / "knn.yaml"
    config.write_text(yaml.safe_dump(knn_eval_config(image_root)))
    capsys.readouterr()
    assert run_eval("--config", config, "--resume", ckpt, "--device", "cpu", f"save_dir={tmp_path}") == 2
    err = capsys.readouterr().err
    expected = {"missing keys": r"encoder does not match the model: missing keys ['encoder.layer4.1",
                "no encoder": "is not a checkpoint of this project"}.get(kind, "is not a readable checkpoint")
    assert len(error_lines(err)) == 1 and expected in error_lines(err)[0] and "Traceback" not in err, err
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("weighted", [True, False])
def test_knn_search_equals_brute_force_per_query(weighted):
    """Queries in batches of 13 and the bank in chunks of 64 give the per-query answer exactly."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen)
    bank_labels, labels = torch.randint(5, (500,), generator=gen), torch.randint(5, (97,), generator=gen)
    bank = nn.functional.normalize(centres[bank_labels] + 1.5 * torch.randn(500, 16, generator=gen), dim=1)
    queries = nn.functional.normalize(centres[labels] + 1.5 * torch.randn(97, 16, generator=gen), dim=1)
    ks = [1, 4, 10, 25]
    counts = knn_counts(queries, labels, bank, bank_labels, ks, 5, temperature=0.07, use_weighting=weighted,
                        query_batch=13, bank_chunk=64)
    assert counts.total == 97
    assert counts.correct == brute_force_knn(queries, labels, bank, bank_labels, ks, 5, weighted=weighted)
    assert 0.3 < counts.accuracy(10) < 0.95  # a test with wrong answers to get right


def knn_eval_config(root: Path) -> dict:
    return {
        "valid_dataloader": [folder_block(root, True, 8), folder_block(root, False, 4)],
        "evaluator": [{"type": "KNNEvaluator", "args": {
            "log_name": "_final", "k": KS, "num_classes": 3, "temperature": 0.07, "mute_tqdm": False,
            "query_batch_size": 4, "bank_chunk_size": 7}}],
    }


def test_eval_py_knn_on_an_image_folder_equals_brute_force(tmp_path, image_root, released):
    ckpt, net = released
    config = tmp_path / "knn.yaml"
    config.write_text(yaml.safe_dump(knn_eval_config(image_root)))
    out = tmp_path / "results.json"
    assert run_eval("--config", config, "--resume", ckpt, "--name", "knn", "--device", "cpu",
                    "--results-json", out, f"save_dir={tmp_path}") == 0
    metrics = json.loads(out.read_text())["final"]
    bank, bank_labels = folder_features(net.encoder, image_root, train=True)
    queries, labels = folder_features(net.encoder, image_root, train=False)
    assert bank.shape[0] == 3 * N_TRAIN and queries.shape[0] == 3 * N_VAL
    expected = brute_force_knn(queries, labels, bank, bank_labels, KS, 3)
    assert metrics == {f"knn@{k}_final": expected[k] / (3 * N_VAL) for k in KS}
    run = next((tmp_path / "models" / "knn").iterdir())
    assert {"config.yaml", "results.json", "eval.log"} <= {p.name for p in run.iterdir()}


# ----------------------------------------------------------------------------- linear probing


def test_linear_probe_separates_separable_features():
    """Two heads from one pass per batch: plain SGD reaches ~100%; the LARC head trains too;
    the 101 val samples (not a multiple of the batch) all count."""
    x, y = blobs(512, seed=0)
    xv, yv = blobs(101, seed=1)
    probe = LinearProbingEvaluator(hyperparams=[probe_settings("_sgd", 64, 8, 2.0, False),
                                                probe_settings("_larc", 64, 8, 2.0, True)],
                                   num_classes=4, mute_tqdm=True)
    metrics = probe.evaluate(FeatureEncoder(8), TensorLoader(x, y, 64, True), TensorLoader(xv, yv, 64, False),
                             torch.device("cpu"))
    assert set(metrics) == {f"linear_prob_{n}_val_top_{k}" for n in ("sgd", "larc") for k in (1, 5)}
    assert metrics["linear_prob_sgd_val_top_1"] >= 0.98 and metrics["linear_prob_sgd_val_top_5"] == 1.0
    assert 0.0 <= metrics["linear_prob_larc_val_top_1"] <= 1.0 and probe.last_total == 101


def test_linear_probe_batch_must_match_its_loader():
    x, y = blobs(64, seed=0)
    probe = LinearProbingEvaluator(hyperparams=[probe_settings("_a", 128, 1, 0.1, True)], num_classes=4)
    with pytest.raises(ValueError, match="batch_size 128 differs from its training loader's batch_size 32"):
        probe.evaluate(FeatureEncoder(8), TensorLoader(x, y, 32, True), TensorLoader(x, y, 32, False),
                       torch.device("cpu"))


def test_evaluators_name_labels_beyond_num_classes():
    """Blobs of 4 classes given to evaluators of 3: one clear error each, not cross-entropy's index
    error (a device assert on CUDA) or a wrong vote."""
    x, y = blobs(64, seed=0)
    probe = LinearProbingEvaluator(hyperparams=[probe_settings("_a", 32, 1, 0.1, True)], num_classes=3)
    with pytest.raises(DataError, match=r"linear probe, val set: labels outside \[0, 3\) .* span \[0, 3\]"):
        probe.evaluate(FeatureEncoder(8), TensorLoader(x, y, 32, True), TensorLoader(x, y, 32, False),
                       torch.device("cpu"))
    knn = KNNEvaluator(num_classes=3, k=[1], mute_tqdm=True)
    with pytest.raises(DataError, match=r"k-NN bank: labels outside \[0, 3\) .* span \[0, 3\]"):
        knn.evaluate(FeatureEncoder(8), TensorLoader(x, y, 32, False), TensorLoader(x, y, 32, False),
                     torch.device("cpu"))
    # queries of an unlabelled val split (-1), against a good bank: refused, not counted wrong
    with pytest.raises(DataError, match=r"k-NN queries: labels outside \[0, 4\) .* span \[-1, -1\]"):
        KNNEvaluator(num_classes=4, k=[1], mute_tqdm=True).evaluate(
            FeatureEncoder(8), TensorLoader(x, y, 32, False), TensorLoader(x, torch.full_like(y, -1), 32, False),
            torch.device("cpu"))
    # a training batch whose label exceeds the probe's classes, with a good val set
    with pytest.raises(DataError, match=r"linear probe, training batch: labels outside \[0, 4\)"):
        LinearProbingEvaluator(hyperparams=[probe_settings("_a", 32, 1, 0.1, True)], num_classes=4).evaluate(
            FeatureEncoder(8), TensorLoader(x, y + 1, 32, True), TensorLoader(x, y, 32, False), torch.device("cpu"))


def test_linear_probe_on_several_processes_needs_a_training_loader():
    """Each step all-reduces the heads' gradients: an evaluation-mode loader (batch counts that may
    differ between processes) is refused before anything runs."""
    x, y = blobs(64, seed=0)
    probe = LinearProbingEvaluator(hyperparams=[probe_settings("_a", 32, 1, 0.1, True)], num_classes=4,
                                   distributed=True)
    with pytest.raises(ConfigError, match="linear probe: with several processes its training loader"):
        probe.check_loaders(TensorLoader(x, y, 32, False), TensorLoader(x, y, 32, False))
    probe.check_loaders(TensorLoader(x, y, 32, True), TensorLoader(x, y, 32, False))


# ----------------------------------------------------------------------------- two processes


def evaluate_everything(root: Path, rank: int, world: int) -> dict:
    """k-NN and two probes (image folder; separable features) as one process of `world` sees them."""
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet10", width=8)
    cpu, distributed = torch.device("cpu"), world > 1
    knn = KNNEvaluator(distributed=distributed, num_classes=3, k=KS, query_batch_size=3, bank_chunk_size=10)
    out = knn.evaluate(encoder, folder_loader(root, True, 4, rank, world), folder_loader(root, False, 4, rank, world),
                       cpu)
    out["knn_queries"] = knn.last_counts.total
    probe = LinearProbingEvaluator(distributed=distributed, num_classes=3, mute_tqdm=True,
                                   hyperparams=[probe_settings("_folder", 12, 3, 4.0, False)])
    out |= probe.evaluate(encoder, folder_loader(root, True, 12, rank, world, shuffle=True),
                          folder_loader(root, False, 4, rank, world), cpu)
    out["probe_folder_samples"] = probe.last_total
    x, y = blobs(256, seed=0)
    xv, yv = blobs(101, seed=1)
    probe = LinearProbingEvaluator(distributed=distributed, num_classes=4, mute_tqdm=True,
                                   hyperparams=[probe_settings("_blobs", 32, 4, 2.0, False)])
    out |= probe.evaluate(FeatureEncoder(8), TensorLoader(x, y, 32, True, rank, world),
                          TensorLoader(xv, yv, 32, False, rank, world), cpu)
    out["probe_blobs_samples"] = probe.last_total
    out["probe_blobs_losses"] = probe.last_losses["_blobs"]  # logged by rank 0
    return out


def two_process_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = evaluate_everything(Path(root), rank, world)
        rows = torch.arange(14 if rank == 0 else 6).view(-1, 2) + 100 * rank  # 7 and 3 rows
        gathered = gather_in_order(rows, block_rows=3)  # several blocks, the last one partial
        metrics["gather_in_order"] = gathered.tolist()
        try:  # a label out of range on rank 1 only: both refuse (rank 0 alone would wait in a collective)
            check_labels(torch.tensor([0, 1] if rank == 0 else [1, 5]), 4, "labels")
            metrics["label_check"] = "passed"
        except DataError:
            metrics["label_check"] = "refused"
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_count_an_odd_val_set_once(tmp_path, image_root):
    """15 queries and 101 probe val samples over 2 processes: every one counted once, and the
    metrics are those of one process, the probe's logged training losses included (the global
    batch's, not rank 0's half)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_everything(image_root, 0, 1)
    finally:
        torch.set_num_threads(threads)
    # forked, where the platform can: a spawned process imports torch, torchvision and this module again (~8 s each)
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(two_process_worker, args=(2, free_port(), str(image_root), str(tmp_path)), nprocs=2,
                       join=True, start_method=start_method)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    expected_rows = torch.cat((torch.arange(14).view(-1, 2), torch.arange(6).view(-1, 2) + 100)).tolist()
    assert ranks[0].pop("gather_in_order") == expected_rows
    assert ranks[0].pop("label_check") == "refused"  # equal on both ranks (above)
    assert single["knn_queries"] == ranks[0]["knn_queries"] == 3 * N_VAL
    assert single["probe_folder_samples"] == ranks[0]["probe_folder_samples"] == 3 * N_VAL
    assert single["probe_blobs_samples"] == ranks[0]["probe_blobs_samples"] == 101
    assert len(single["probe_blobs_losses"]) == 4
    assert ranks[0].pop("probe_blobs_losses") == pytest.approx(single.pop("probe_blobs_losses"), rel=1e-5)
    assert ranks[0] == pytest.approx(single, abs=1e-12)
    assert single["linear_prob_blobs_val_top_1"] >= 0.98


# ----------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_loads_into_torchvision_with_only_fc_missing(tmp_path):
    block = {"type": "RegularEncoder", "args": {"arch": "resnet18"}}
    net = tiny_model(block, seed=2)
    ckpt, output = tmp_path / "run" / "latest_model.pth", tmp_path / "export" / "resnet18.pth"
    save_released(net, run_config(block), ckpt)
    subprocess.run([sys.executable, "pretrained/export_torchvision.py", "--resume", str(ckpt), "--output",
                    str(output)], cwd=ROOT, check=True, capture_output=True)
    state = torch.load(output, weights_only=True)
    model = tvm.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    model.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), net.encoder.eval()(images), rtol=0, atol=0)
    assert [p.name for p in output.parent.iterdir()] == ["resnet18.pth"]  # no temporary left


def test_export_refuses_an_encoder_torchvision_does_not_have(tmp_path, capsys, released):
    output = tmp_path / "out.pth"
    assert export_torchvision.main(["--resume", str(released[0]), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "is not a torchvision architecture" in err and not output.exists()


# ----------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("config,expected", [
    ("eval_knn", {"evaluators": ["KNNEvaluator"], "learning_rate": None,
                  "knn": [{"k": [1, 10, 20, 50], "temperature": 0.07, "bank_device": "cpu", "bank_dtype": "float32",
                           "max_feature_bank": None}],
                  "batch_size_per_process": {"valid_dataloader.0": 512, "valid_dataloader.1": 512}}),
    ("eval_linear_probing", {"evaluators": ["LinearProbingEvaluator"], "learning_rate": [1.6], "epochs": [90],
                             "knn": None,
                             "batch_size_per_process": {"valid_dataloader.0": 4096, "valid_dataloader.1": 4096}}),
])
def test_eval_dry_run_on_top_of_a_training_checkpoint(tmp_path, capsys, config, expected):
    """The seed README's commands on a checkpoint of the quickstart: the encoder from the run's
    config.yaml, loaders and evaluator from the eval config; nothing read, nothing written."""
    train_config = yaml.safe_load(QUICKSTART.read_text())
    run = tmp_path / "models" / "quickstart" / "0101_000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**train_config, "save_dir": str(tmp_path / "out")}))
    net = SSLModel(build_encoder(validate(train_config)), nn.Identity())
    torch.save({"epoch": 0, "step": 5, "encoder": net.encoder.state_dict(), "config": train_config},
               run / "latest_model.pth")
    capsys.readouterr()
    code = run_eval("--config", ROOT / "configs" / f"{config}.yaml", "--resume", run / "latest_model.pth",
                    "-name", f"{config}_quickstart", "--device", "cpu", "--dry-run")
    assert code == 0
    out = capsys.readouterr().out
    summary, expected = last_json_line(out), dict(expected)
    batches = summary.pop("batch_size_per_process")
    assert {k: v for k, v in batches.items() if k.startswith("valid")} == expected.pop("batch_size_per_process")
    assert {k: summary[k] for k in expected} == expected
    assert summary["encoder"] == train_config["encoder"] and summary["precision"] == "float32"
    printed = yaml.safe_load(out[: out.rindex("\n{")])
    assert printed["name"] == f"{config}_quickstart" and printed["encoder"] == train_config["encoder"]
    assert printed["valid_dataloader"][0]["type"] == "web_dataloader"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_with_a_float16_bank_on_cuda_agrees_with_float32():
    gen = torch.Generator().manual_seed(0)
    centres = nn.functional.normalize(torch.randn(50, 256, generator=gen), dim=1)
    bank_labels, labels = torch.randint(50, (20_000,), generator=gen), torch.randint(50, (1000,), generator=gen)
    bank = nn.functional.normalize(centres[bank_labels] + 0.1 * torch.randn(20_000, 256, generator=gen), dim=1)
    queries = nn.functional.normalize(centres[labels] + 0.1 * torch.randn(1000, 256, generator=gen), dim=1)
    assert KNNEvaluator().plan(torch.device("cuda"))["bank_dtype"] == "float16"
    cpu = knn_counts(queries, labels, bank, bank_labels, [1, 20], 50)
    gpu = knn_counts(queries.cuda(), labels.cuda(), bank.cuda().half(), bank_labels.cuda(), [1, 20], 50,
                     bank_chunk=4096, query_batch=256)
    assert gpu.total == cpu.total == 1000
    for k in (1, 20):
        assert abs(gpu.correct[k] - cpu.correct[k]) <= 10, (gpu, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_py_knn_on_cuda_matches_brute_force(tmp_path, image_root, released):
    """The GPU path end to end: encoder on CUDA, float16 bank; the same answers as float64 on the CPU."""
    ckpt, net = released
    config = tmp_path / "knn.yaml"
    config.write_text(yaml.safe_dump(knn_eval_config(image_root)))
    out = tmp_path / "results.json"
    assert run_eval("--config", config, "--resume", ckpt, "--gpu", "0", "--results-json", out,
                    f"save_dir={tmp_path}") == 0
    metrics = json.loads(out.read_text())["final"]
    bank, bank_labels = folder_features(net.encoder, image_root, train=True)
    queries, labels = folder_features(net.encoder, image_root, train=False)
    expected = brute_force_knn(queries, labels, bank, bank_labels, KS, 3)
    for k in KS:
        assert metrics[f"knn@{k}_final"] == pytest.approx(expected[k] / (3 * N_VAL), abs=1.01 / (3 * N_VAL))
