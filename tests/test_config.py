"""Config loading, inheritance, overrides and strict validation (errors name the key path)."""

import copy

import pytest
import yaml

import trainer.build  # noqa: F401  (registers every config type)
from utils.config import ConfigError, apply_overrides, load_config
from utils.schema import validate

from .conftest import PAPER_2VIEWS_100EP, QUICKSTART


@pytest.fixture
def reference():
    """The paper's 2views_100ep config as saved beside a released checkpoint (with `name`), with the
    k-NN options of the paper's eval config."""
    config = yaml.safe_load(PAPER_2VIEWS_100EP)
    config["name"] = "2views_100ep"
    config["evaluator"][0]["args"].update(mute_tqdm=True, compute_sim_on_cpu=False)
    return config


def test_reference_schema_validates(reference):
    exp = validate(reference, world_size=4)
    assert exp.trainer.epochs == 100 and exp.trainer.mixed_precision is True
    assert exp.loss["type"] == "GroCo"


def test_quickstart_validates():
    exp = validate(load_config(QUICKSTART))
    assert exp.encoder["args"]["arch"] == "resnet18"


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.args.topk_negs=5", r"loss\.args\.topk_negs: unknown key; valid keys here: .*topk_neg"),
        ("loss.type=GroKo", r"loss\.type: unknown loss type 'GroKo'; valid types: GroCo, NT_Xent"),
        ("loss.args.topk_neg=ten", r"loss\.args\.topk_neg: expected an integer, got str 'ten'"),
        ("trainer.epochs=1.5", r"trainer\.epochs: expected an integer"),
        ("trainer.mixed_precision=fp8", r"trainer\.mixed_precision: .*'fp8'"),
        ("learning_rate_scaling=cubic", r"learning_rate_scaling: 'cubic' is not one of \['linear', 'sqrt', 'none'\]"),
        ("trainer.epoch=3", r"trainer\.epoch: unknown key"),
        ("optimiser={}", r"optimiser: unknown key"),
        ("evaluator.0.type=KNN", r"evaluator\.0\.type: unknown evaluator type 'KNN'; valid types: KNNEvaluator"),
        ("evaluator.0.args.k=[x]", r"evaluator\.0\.args\.k\.0: expected an integer"),
        ("evaluator.1.args.hyperparams.0.epochs=many",
         r"evaluator\.1\.args\.hyperparams\.0\.epochs: expected an integer"),
        ("evaluator.1.args.hyperparams.0.optimizer.type=Lion",
         r"hyperparams\.0\.optimizer\.type: unknown optimizer type 'Lion'; valid types: Adam, SGD"),
        ("loss.args.distributed=true", r"loss\.args\.distributed: set by the program, not by the config"),
        ("encoder.args={}", r"encoder\.args\.arch: required argument is missing"),
        ("train_dataloader.type=tar_loader", r"train_dataloader\.type: unknown dataloader type 'tar_loader'"),
    ],
)
def test_validation_errors_name_the_key_path(reference, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(reference, [override]), world_size=1)


def test_batch_must_divide_by_process_count(reference):
    validate(reference, world_size=8)
    with pytest.raises(ConfigError, match=r"train_dataloader\.args\.batch_size: 1024 .* does not divide by the 3 "):
        validate(reference, world_size=3)


def test_training_needs_its_blocks(reference):
    del reference["loss"]
    with pytest.raises(ConfigError, match="loss: required for training"):
        validate(reference)


def test_base_inheritance_and_overrides(tmp_path, reference):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(reference))
    (tmp_path / "mid.yaml").write_text("_base_: base.yaml\nbase_learning_rate: 0.375\nwarmup_epochs: 10\n")
    (tmp_path / "leaf.yaml").write_text("_base_: mid.yaml\ntrainer: {epochs: 200}\n")
    config = load_config(tmp_path / "leaf.yaml")
    assert config["base_learning_rate"] == 0.375 and config["warmup_epochs"] == 10
    assert config["trainer"]["epochs"] == 200 and config["trainer"]["log_step"] == 50  # merged, not replaced
    assert config["train_dataloader"] == reference["train_dataloader"]

    changed = apply_overrides(config, ["valid_dataloader.1.args.batch_size=512", "seed=3", "loss.args.k2=null"])
    assert changed["valid_dataloader"][1]["args"]["batch_size"] == 512 and changed["seed"] == 3
    assert config["seed"] is None  # the input is not mutated
    with pytest.raises(ConfigError, match="valid_dataloader.7: '7' is not an index of a list of 2"):
        apply_overrides(config, ["valid_dataloader.7.args.batch_size=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(config, ["seed"])


def test_inheritance_loop_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_validation_does_not_change_the_config(reference):
    before = copy.deepcopy(reference)
    validate(reference, world_size=4)
    assert reference == before
