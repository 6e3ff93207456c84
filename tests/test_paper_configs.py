"""The paper's experiment configs (docs/reference.md §9): each resolves, through `_base_`, to exactly the paper's
config, and a dry run of train.py derives the paper's learning rate, batch, schedule and loss.
Every file in configs/ loads and validates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from utils.config import apply_overrides, deep_merge, load_config
from utils.schema import TRAINING_KEYS, validate

from .conftest import PAPER_2VIEWS_100EP, ROOT, last_json_line, run_train

CONFIGS = ROOT / "configs"



def epochs(n: int) -> list[str]:
    """A longer schedule: the linear probe runs after the last epoch (0-based)."""
    return [f"trainer.epochs={n}", f"evaluator.1.args.hyperparams.0.apply_evaluator_after_epochs=[{n - 1}]"]


def views(n: int) -> list[str]:
    return [f"train_dataloader.args.n_augs={n}", f"loss.args.n_augs={n}"]


# Every paper config but 2views_100ep also kept a checkpoint every 100 epochs.
PERIODIC = ["trainer.save_period=100"]
LONG = ["base_learning_rate=0.375", "warmup_epochs=10"]
MULTICROP = ["train_dataloader.args.transform_type=dino_multicrop", *views(8), "loss.args.n_pos_augs=2",
             "warmup_epochs=10"]
SIMCLR = ["train_dataloader.args.transform_type=simclr", "projection.args.output_dim=128",
          "loss={type: NT_Xent, args: {temperature: 0.1}}", "learning_rate_scaling=sqrt", "base_learning_rate=0.075",
          "optimizer_use_larc=true", "warmup_epochs=10"]
EXAMPLE = [*PERIODIC, "train_dataloader.args.batch_size=32", "valid_dataloader.0.args.batch_size=512",
           "valid_dataloader.1.args.batch_size=512", "evaluator.1.args.hyperparams.0.batch_size=512"]
FOLDERS = [
    *EXAMPLE,
    "train_dataloader={type: image_folder_dataloader, args: {root: ./data/imagenet/original, shuffle: true, "
    "num_workers: 16, batch_size: 32, transform_type: dino, n_augs: 2}}",
    "valid_dataloader=[{type: image_folder_dataloader, args: {root: ./data/imagenet/original, shuffle: true, "
    "num_workers: 16, batch_size: 512, train: true, transform_type: linear_prob}}, "
    "{type: image_folder_dataloader, args: {root: ./data/imagenet/original, shuffle: false, num_workers: 16, "
    "batch_size: 512, train: false}}]",
]

# docs/reference.md §9: each paper config as its differences from 2views_100ep.
DIFFERENCES = {
    "2views_100ep": [],
    "2views_100ep_bs256": [*PERIODIC, "train_dataloader.args.batch_size=256"],
    "2views_100ep_bs512": [*PERIODIC, "train_dataloader.args.batch_size=512"],
    "2views_200ep": [*PERIODIC, *LONG, *epochs(200)],
    "2views_400ep": [*PERIODIC, *LONG, *epochs(400)],
    "2views_800ep": [*PERIODIC, *LONG, *epochs(800), "base_learning_rate=0.1875"],
    "3views_100ep": [*PERIODIC, *views(3)],
    "4views_100ep": [*PERIODIC, *views(4), "learning_rate_scaling=sqrt"],
    "4views_200ep": [*PERIODIC, *views(4), *LONG, *epochs(200), "optimizer.args.weight_decay=2e-6"],
    "4views_400ep": [*PERIODIC, *views(4), *LONG, *epochs(400), "optimizer.args.weight_decay=2e-6"],
    "multicrop_100ep": [*PERIODIC, *MULTICROP],
    "multicrop_200ep": [*PERIODIC, *MULTICROP, *LONG, *epochs(200), "optimizer.args.weight_decay=2e-6"],
    "multicrop_400ep": [*PERIODIC, *MULTICROP, *LONG, *epochs(400), "optimizer.args.weight_decay=2e-6"],
    "multicrop_800ep": [*PERIODIC, *MULTICROP, *LONG, *epochs(800), "optimizer.args.weight_decay=2e-6",
                        "base_learning_rate=0.1875", "learning_rate_scaling=sqrt"],
    "baselines/simclr_2views_100ep": [*PERIODIC, *SIMCLR],
    "baselines/simclr_3views_100ep": [*PERIODIC, *SIMCLR, "train_dataloader.args.n_augs=3",
                                      "loss={type: NT_XentAllCombinations, args: {temperature: 0.1, n_augs: 3}}"],
    "baselines/simclr_4views_100ep": [*PERIODIC, *SIMCLR, "train_dataloader.args.n_augs=4",
                                      "loss={type: NT_XentAllCombinations, args: {temperature: 0.1, n_augs: 4}}"],
    "baselines/simclr_2views_top10neg_stop_grad": [
        *PERIODIC, *SIMCLR, "loss={type: NT_Xent, args: {temperature: 0.5, topk_neg: 10, stop_grad: true}}"],
    "examples/example": EXAMPLE,
    "examples/imagenet_folders": FOLDERS,
    "examples/imagenet_folder": FOLDERS,
}

# docs/reference.md §4 and §9: what train.py derives. 1,280,000 samples / batch = steps per epoch.
# name: (learning rate, global batch, epochs, warm-up epochs, loss)
DERIVED = {
    "2views_100ep": (24.0, 1024, 100, 1, "GroCo"),          # 0.75 x 32 x 1024 / 1024
    "2views_100ep_bs256": (6.0, 256, 100, 1, "GroCo"),      # 0.75 x 32 x 256 / 1024
    "2views_100ep_bs512": (12.0, 512, 100, 1, "GroCo"),
    "2views_200ep": (12.0, 1024, 200, 10, "GroCo"),         # 0.375 x 32
    "2views_400ep": (12.0, 1024, 400, 10, "GroCo"),
    "2views_800ep": (6.0, 1024, 800, 10, "GroCo"),          # 0.1875 x 32
    "3views_100ep": (24.0, 1024, 100, 1, "GroCo"),
    "4views_100ep": (24.0, 1024, 100, 1, "GroCo"),          # 0.75 x sqrt(1024)
    "4views_200ep": (12.0, 1024, 200, 10, "GroCo"),
    "4views_400ep": (12.0, 1024, 400, 10, "GroCo"),
    "multicrop_100ep": (24.0, 1024, 100, 10, "GroCo"),
    "multicrop_200ep": (12.0, 1024, 200, 10, "GroCo"),
    "multicrop_400ep": (12.0, 1024, 400, 10, "GroCo"),
    "multicrop_800ep": (6.0, 1024, 800, 10, "GroCo"),       # 0.1875 x sqrt(1024)
    "baselines/simclr_2views_100ep": (2.4, 1024, 100, 10, "NT_Xent"),  # 0.075 x sqrt(1024)
    "baselines/simclr_3views_100ep": (2.4, 1024, 100, 10, "NT_XentAllCombinations"),
    "baselines/simclr_4views_100ep": (2.4, 1024, 100, 10, "NT_XentAllCombinations"),
    "baselines/simclr_2views_top10neg_stop_grad": (2.4, 1024, 100, 10, "NT_Xent"),
    "examples/example": (0.75, 32, 100, 1, "GroCo"),        # 0.75 x 32 x 32 / 1024
}


def paper_config(name: str) -> dict:
    return apply_overrides(yaml.safe_load(PAPER_2VIEWS_100EP), DIFFERENCES[name])


def config_path(name: str):
    return CONFIGS / f"{name}.yaml"


@pytest.mark.parametrize("name", DIFFERENCES)
def test_config_resolves_to_the_papers(name):
    assert load_config(config_path(name)) == paper_config(name)


@pytest.mark.parametrize("name", DERIVED)
def test_dry_run_derives_the_papers_settings(name, tmp_path, capsys):
    assert run_train("--config", config_path(name), "--device", "cpu", "--dry-run", f"save_dir={tmp_path}") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary, printed = last_json_line(lines[-1]), yaml.safe_load("\n".join(lines[:-1]))
    lr, batch, n_epochs, warmup, loss = DERIVED[name]
    steps = 1280000 // batch
    assert summary["learning_rate"] == pytest.approx(lr, rel=1e-12)
    assert summary["batch_size_per_process"] == summary["global_batch_size"] == batch
    assert summary["epochs"] == n_epochs and summary["loss"] == loss
    assert summary["steps_per_epoch"] == steps
    assert summary["warmup_steps"] == warmup * steps and summary["total_steps"] == n_epochs * steps
    assert printed["derived"] == {k: v for k, v in summary.items() if k not in ("device", "precision", "seed")}
    assert printed["name"] == name.split("/")[-1]
    config = {k: v for k, v in printed.items() if k not in ("derived", "name", "save_dir")}
    assert config == {k: v for k, v in paper_config(name).items() if k != "save_dir"}
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_the_image_folder_example_needs_no_data(tmp_path, capsys):
    """The folders are scanned only when training starts: the dry run cannot count the steps."""
    argv = ["--config", config_path("examples/imagenet_folders"), "--device", "cpu", "--dry-run",
            f"save_dir={tmp_path}", f"train_dataloader.args.root={tmp_path / 'missing'}"]
    assert run_train(*argv) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["learning_rate"] == pytest.approx(0.75) and summary["batch_size_per_process"] == 32
    assert summary["steps_per_epoch"] is None and summary["warmup_steps"] is None


@pytest.mark.slow
def test_readme_command_in_a_fresh_process(tmp_path):
    """`python train.py --config configs/2views_100ep.yaml` as the README writes it (dry run)."""
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/2views_100ep.yaml", "--device", "cpu", "--dry-run",
         f"save_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    summary = last_json_line(out.stdout)
    assert summary["learning_rate"] == 24.0 and summary["warmup_steps"] == 1250 and summary["total_steps"] == 125000


def test_every_config_file_loads_and_validates():
    """Complete training configs validate alone; fragments under base/ validate merged onto a
    training config; evaluation configs validate as `eval.py --resume` uses them, merged onto the
    config of a training run."""
    training_run = paper_config("2views_100ep")
    kinds: dict[str, list[str]] = {"training": [], "fragment": [], "evaluation": []}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        name = path.relative_to(CONFIGS).with_suffix("").as_posix()
        config = load_config(path)
        if name.startswith("base/"):
            validate(deep_merge(training_run, config))
            kinds["fragment"].append(name)
        elif all(key in config for key in TRAINING_KEYS):
            validate(config)
            kinds["training"].append(name)
        else:
            validate(deep_merge(training_run, config), training=False)
            kinds["evaluation"].append(name)
    assert set(DIFFERENCES) | {"examples/quickstart"} <= set(kinds["training"])
    assert kinds["fragment"], "configs/base/ holds the shared values"


@pytest.mark.parametrize("name", DIFFERENCES)
def test_the_readme_launches_divide_the_batches(name):
    """The README trains on 4 GPUs; the paper's batches also split over 8."""
    for world_size in (4, 8):
        validate(load_config(config_path(name)), world_size=world_size)


@pytest.mark.parametrize("name", DIFFERENCES)
def test_views_agree_between_loader_and_loss(name):
    config = load_config(config_path(name))
    loss_views = config["loss"]["args"].get("n_augs", 2)  # NT_Xent takes 2 views
    assert config["train_dataloader"]["args"]["n_augs"] == loss_views
