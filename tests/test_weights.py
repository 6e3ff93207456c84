"""Other methods' checkpoints (trainer/weights.py, eval.py --weights, pretrained/import_weights.py,
utils/results_table.py): a torchvision ResNet-18 with random weights and BatchNorm statistics, saved
in the layout of each method's files with the heads, momentum encoders and queues they carry, loads
into the config's encoder with the ResNet's own features; broken, unknown and ambiguous files are
refused in one line."""

from __future__ import annotations

import argparse
import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import yaml
from torch import nn

from data_loader.base import LoaderRuntime
from data_loader.digits import DigitsLoader
from pretrained import export_torchvision, import_weights
from trainer.build import build_encoder
from trainer.checkpoint import CheckpointError, load_checkpoint, load_module_state
from trainer.knn import KNNEvaluator
from trainer.weights import FORMATS, choose_format, encoder_state, fit, infer_encoder_block, read_weights, split_trunk
from utils import results_table
from utils.schema import validate

from .conftest import run_eval

BLOCK = {"type": "RegularEncoder", "args": {"arch": "resnet18"}}  # torchvision's ResNet-18, standard stem
IMAGE_SIZE = 16  # the digits' size in the quickstart: ResNet-18's standard stem leaves 4 x 4 after its max-pool
# k-NN on the digits: the 500 held-out ones against a bank of the first 100 training ones (ResNet-18's
# last stage costs as much on a 1 x 1 map as on 7 x 7: every image counts)
KNN = {"log_name": "_final", "k": [1, 20], "num_classes": 10, "temperature": 0.07, "mute_tqdm": True,
       "max_feature_bank": 100}


# ----------------------------------------------------------------------------- the files


def random_resnet(seed: int) -> tvm.ResNet:
    """torchvision's ResNet-18, random weights and BatchNorm statistics (affine and running)."""
    torch.manual_seed(seed)
    net = tvm.resnet18()
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
            m.running_mean = torch.randn(m.running_mean.shape, generator=gen) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=gen) + 0.5
            m.num_batches_tracked += 1000 + seed
    return net.eval()


def prefixed(prefix: str, state: dict) -> OrderedDict:
    return OrderedDict((prefix + k, v.clone()) for k, v in state.items())


def head(prefix: str, *layers: nn.Module) -> OrderedDict:
    """The state dict of `nn.Sequential(*layers)` under `prefix`."""
    return prefixed(prefix, nn.Sequential(*layers).state_dict())


def without_fc(state: dict) -> OrderedDict:
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))


def layouts(net: tvm.ResNet, other: tvm.ResNet) -> dict:
    """`net` in each method's file layout; `other` (another ResNet) stands for the online network
    where the file's encoder is a momentum one (DINO's teacher) and for momentum encoders."""
    tv, trunk, second = net.state_dict(), without_fc(net.state_dict()), without_fc(other.state_dict())
    sgd = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}
    dino_head = head("head.", nn.Linear(512, 64), nn.GELU(), nn.Linear(64, 32))
    dino_head |= {"head.last_layer.weight_g": torch.ones(100, 1), "head.last_layer.weight_v": torch.randn(100, 32)}
    moco_fc = head("fc.", nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    v3_fc = head("fc.", nn.Linear(512, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32, bias=False),
                 nn.BatchNorm1d(32, affine=False))
    solo_projector = head("projector.", nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    return {
        "groco": {"epoch": 99, "step": 125_000, "encoder": prefixed("module.encoder.", trunk),
                  "projection": head("module.projection.", nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                     nn.Linear(64, 16)),
                  "optimizer": sgd, "config": {"encoder": BLOCK, "name": "groco"}},
        "torchvision": tv,  # also timm's ResNets
        "backbone": trunk,  # VICReg's, Barlow Twins' and DINO's backbone-only files
        "dino": {"student": prefixed("module.backbone.", second) | prefixed("module.", dino_head),
                 "teacher": prefixed("backbone.", trunk) | dino_head, "optimizer": sgd, "epoch": 800,
                 "args": argparse.Namespace(arch="resnet50", out_dim=60000, momentum_teacher=0.996),
                 "dino_loss": {"center": torch.zeros(1, 100)}},
        "moco": {"epoch": 200, "arch": "resnet50", "args": argparse.Namespace(moco_k=65536, mlp=True),
                 "state_dict": prefixed("module.encoder_q.", trunk) | prefixed("module.encoder_q.", moco_fc)
                 | prefixed("module.encoder_k.", second) | prefixed("module.encoder_k.", moco_fc)
                 | {"module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
                 "optimizer": sgd},
        "mocov3": {"epoch": 300, "arch": "resnet50", "scaler": {"scale": 65536.0},
                   "state_dict": prefixed("module.base_encoder.", trunk) | prefixed("module.base_encoder.", v3_fc)
                   | prefixed("module.momentum_encoder.", second) | prefixed("module.momentum_encoder.", v3_fc)
                   | head("module.predictor.", nn.Linear(32, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                          nn.Linear(64, 32, bias=False)),
                   "optimizer": sgd},
        "swav": prefixed("module.", trunk)
        | head("module.projection_head.", nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
        | {"module.prototypes.weight": torch.randn(300, 32)},
        "lightning": {"epoch": 399, "global_step": 20_000, "pytorch-lightning_version": "1.9.5",
                      "state_dict": prefixed("backbone.", trunk) | solo_projector
                      | prefixed("momentum_backbone.", second) | prefixed("momentum_", solo_projector)
                      | head("classifier.", nn.Linear(512, 1000)) | {"queue": torch.randn(2, 32, 64)},
                      "optimizer_states": [sgd], "lr_schedulers": [{"last_epoch": 399}], "callbacks": {},
                      "hyper_parameters": {"method": "mocov2plus", "backbone": "resnet18"}},
    }


# the format each layout is told as, and the groups dropped from it
EXPECTED = {
    "groco": ("groco", {"projection"}),
    "torchvision": ("torchvision", {"classifier fc"}),
    "backbone": ("torchvision", set()),
    "dino": ("dino", {"teacher head", "student", "dino_loss"}),
    "moco": ("moco", {"projection head encoder_q.fc", "momentum encoder encoder_k", "queue"}),
    "mocov3": ("mocov3", {"projection head base_encoder.fc", "momentum encoder", "predictor"}),
    "swav": ("swav", {"projection head", "prototypes"}),
    "lightning": ("lightning", {"projector", "momentum_backbone", "momentum_projector", "classifier", "queue"}),
}


@pytest.fixture(scope="module")
def resnet() -> tvm.ResNet:
    return random_resnet(0)


@pytest.fixture(scope="module")
def states(resnet) -> dict[str, dict]:
    return layouts(resnet, random_resnet(1))


@pytest.fixture(scope="module")
def files(states, tmp_path_factory) -> dict[str, Path]:
    """Each layout saved as the method saves it (the released GroCo files: legacy serialisation)."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for name, state in states.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(state, paths[name], _use_new_zipfile_serialization=name != "groco")
    return paths


def encoder() -> nn.Module:
    return build_encoder(validate({"encoder": BLOCK}, training=False)).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """The config's encoder, built once: each test loads every one of its tensors (strictly)."""
    return encoder()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def features(resnet) -> torch.Tensor:
    """The ResNet's own features (its classifier removed) of three random images."""
    reference = copy.deepcopy(resnet)
    reference.fc = nn.Identity()
    with torch.no_grad():
        expected = reference.eval()(IMAGES)
    assert expected.abs().sum() > 0
    return expected


def assert_same_features(model: nn.Module, expected: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IMAGES), expected, rtol=0, atol=0)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


# ----------------------------------------------------------------------------- every format


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_every_layout_is_detected_and_gives_the_resnets_features(layout, files, resnet, model, features):
    state, trunk = encoder_state(files[layout], model)
    assert (trunk.format, set(trunk.dropped)) == EXPECTED[layout]
    assert not trunk.filled and not trunk.unexpected
    model.load_state_dict(state)
    assert_same_features(model, features)
    for name, value in state.items():  # buffers too: BatchNorm statistics and counters
        assert torch.equal(value, resnet.state_dict()[name[len("encoder."):]]), name


@pytest.mark.parametrize("layout", ["moco", "swav"])
def test_the_format_can_be_named(layout, files, model):
    assert encoder_state(files[layout], model, EXPECTED[layout][0])[1].format == EXPECTED[layout][0]
    with pytest.raises(CheckpointError, match=r"is not a dino file \(DINO's full checkpoint: the teacher\): "
                                              r"top-level keys"):
        encoder_state(files[layout], model, "dino")


@pytest.mark.parametrize("layout", ["dino", "lightning"])
def test_import_gives_the_same_encoder(layout, files, model, features):
    """In memory: what import_weights.py writes, loaded as eval.py --resume loads it."""
    checkpoint = import_weights.convert(files[layout])
    assert checkpoint["config"]["encoder"] == BLOCK  # told from the keys and shapes
    assert checkpoint["imported_from"] == {"path": str(files[layout]), "format": EXPECTED[layout][0]}
    load_module_state(model, checkpoint["encoder"], layout)
    assert_same_features(model, features)


def test_counters_absent_from_old_files_are_zero(resnet, model, features):
    """torchvision's own ImageNet weights predate num_batches_tracked: all absent is accepted."""
    state = OrderedDict((k, v) for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked"))
    trunk = split_trunk(state, choose_format(state, "old.pth"))
    loaded = fit(trunk, model, "old.pth")
    assert len(trunk.filled) == 20 and all(loaded[f"encoder.{k}"] == 0 for k in trunk.filled)
    model.load_state_dict(loaded)
    assert_same_features(model, features)
    # one of them missing is a missing key like any other
    state = OrderedDict((k, v) for k, v in resnet.state_dict().items() if k != "layer2.0.bn1.num_batches_tracked")
    with pytest.raises(CheckpointError, match=r"missing keys \['layer2.0.bn1.num_batches_tracked'\]"):
        fit(split_trunk(state, choose_format(state, "f")), model, "f")


def test_architecture_told_from_the_file():
    for arch, args in (("resnet50", {}), ("resnet10", {"width": 16, "cifar_stem": True})):
        block = {"type": "RegularEncoder", "args": {"arch": arch, **args}}
        state = prefixed("backbone.", build_encoder(validate({"encoder": block}, training=False)).encoder.state_dict())
        trunk = split_trunk({"state_dict": state}, FORMATS["lightning"])
        assert infer_encoder_block(trunk) == block


# ----------------------------------------------------------------------------- refusals


def broken(states: dict, kind: str) -> dict:
    """The MoCo v2 file, broken (its tensors shared, not changed)."""
    weights = OrderedDict(states["moco"]["state_dict"])
    state = {**states["moco"], "state_dict": weights}
    if kind == "missing block":
        for k in [k for k in weights if k.startswith("module.encoder_q.layer4.1.")]:
            del weights[k]
    elif kind == "wrong shape":
        weights["module.encoder_q.layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    elif kind == "stray key":
        weights["module.encoder_q.layer2.0.extra.weight"] = torch.zeros(3)
    elif kind == "unknown structure":
        state = {"model_ema": {"trunk.conv1.weight": torch.zeros(64, 3, 7, 7)}, "epoch": 3}
    elif kind == "ambiguous":
        state["teacher"] = states["dino"]["teacher"]
    return state


REFUSALS = {
    "missing block": r"\(moco\) does not fit the encoder: missing keys \['module.encoder_q.layer4.1.conv1.weight', ",
    "wrong shape": r"other shapes \(file for model\): module.encoder_q.layer3.0.conv1.weight \[256, 128, 1, 1\] for "
                   r"\[256, 128, 3, 3\]",
    "stray key": r"unexpected keys \['module.encoder_q.layer2.0.extra.weight'\]",
    "unknown structure": r"unknown structure, no ResNet encoder in a known layout \(top-level keys \['model_ema', "
                         r"'epoch'\]; model_ema: \['trunk.conv1.weight'\]\); known formats: groco, torchvision",
    "ambiguous": r"is ambiguous: it fits the formats dino, moco; choose one with --weights-format",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_broken_unknown_and_ambiguous_files_are_refused(tmp_path, states, model, kind):
    path = tmp_path / "file.pth"
    torch.save(broken(states, kind), path)
    with pytest.raises(CheckpointError, match=REFUSALS[kind]) as err:
        encoder_state(path, model)
    assert "\n" not in str(err.value)
    if kind == "ambiguous":  # named, it loads
        assert encoder_state(path, model, "moco")[1].format == "moco"


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes.pth is not a readable checkpoint \(") as err:
        read_weights(text)
    assert "\n" not in str(err.value)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match=r"list.pth is not a weights file: it holds a list"):
        read_weights(listed)


def eval_config(tmp_path: Path) -> Path:
    """k-NN on the digits (`KNN`) with the standard-stem ResNet-18."""
    loaders = [{"type": "digits_dataloader", "args": {"batch_size": 100, "train": train, "transform_type": "val",
                                                      "image_size": IMAGE_SIZE}} for train in (True, False)]
    config = {"encoder": BLOCK, "valid_dataloader": loaders, "evaluator": [{"type": "KNNEvaluator", "args": KNN}],
              "seed": 0, "save_dir": str(tmp_path / "out")}
    path = tmp_path / "knn_digits.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("argv,message", [
    (["--weights", "w.pth", "--resume", "c.pth"], "c.pth are exclusive: give one of them"),
    (["--weights", "w.pth"], "w.pth needs --config: its encoder block builds the encoder"),
    (["--weights-format", "swav"], "--weights-format swav needs --weights"),
    (["--weights", "notes.pth"], "notes.pth is not a readable checkpoint"),
])
def test_eval_py_refuses_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    config = ["--config", str(eval_config(tmp_path))] if argv != ["--weights", "w.pth"] else []
    capsys.readouterr()
    argv = [str(tmp_path / a) if a.endswith(".pth") else a for a in argv]
    assert run_eval(*argv, *config, "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end


def expected_knn(resnet: tvm.ResNet) -> dict:
    """The k-NN of the ResNet itself on the digits, as the evaluator computes it."""
    reference = copy.deepcopy(resnet)
    reference.fc = nn.Identity()
    loaders = [DigitsLoader(LoaderRuntime(0, 1, 0), 100, train=t, image_size=IMAGE_SIZE) for t in (True, False)]
    return KNNEvaluator(**KNN).evaluate(reference, *loaders, torch.device("cpu"))


@pytest.mark.slow
def test_eval_py_with_weights_and_after_import_gives_the_resnets_knn(tmp_path, capsys, files, resnet):
    """eval.py --weights on a MoCo v2 file, and eval.py --resume on the SwAV file imported by
    import_weights.py: the k-NN of the ResNet itself; results.json and the table name the files."""
    config = eval_config(tmp_path)
    expected = expected_knn(resnet)
    assert 0.3 < expected["knn@20_final"] < 1.0  # random weights, still better than chance
    capsys.readouterr()
    assert run_eval("--config", config, "--weights", files["moco"], "--name", "moco", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "format moco (MoCo v1/v2" in err and "dropped: projection head encoder_q.fc (4 tensors)" in err
    moco_run = next((tmp_path / "out" / "models" / "moco").iterdir())
    results = json.loads((moco_run / "results.json").read_text())
    assert results["final"] == expected
    assert results["weights"] == {"path": str(files["moco"]), "format": "moco"}

    ckpt = tmp_path / "swav" / "latest_model.pth"
    assert import_weights.main(["--weights", str(files["swav"]), "--output", str(ckpt)]) == 0
    assert yaml.safe_load((ckpt.parent / "config.yaml").read_text())["encoder"] == BLOCK
    assert import_weights.main(["--weights", str(files["swav"]), "--output", str(ckpt)]) == 2  # never overwrites
    assert run_eval("--config", config, "--resume", ckpt, "--name", "swav", "--device", "cpu") == 0
    swav_run = next((tmp_path / "out" / "models" / "swav").iterdir())
    assert json.loads((swav_run / "results.json").read_text())["final"] == expected

    capsys.readouterr()
    assert results_table.main([str(tmp_path / "out"), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "run,encoder,weights,format,knn@1_final,knn@20_final"
    assert rows[1] == f"moco/{moco_run.name},resnet18,{files['moco']},moco,{expected['knn@1_final']}," \
                      f"{expected['knn@20_final']}"
    assert rows[2].startswith(f"swav/{swav_run.name},resnet18,{files['swav']},swav (imported),")


@pytest.mark.slow
def test_export_then_import_gives_identical_weights(tmp_path, states):
    """Our checkpoint -> export_torchvision.py -> import_weights.py: the same tensors, key for key."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "latest_model.pth"
    torch.save(states["groco"], ckpt)
    (run / "config.yaml").write_text(yaml.safe_dump({"encoder": BLOCK, "name": "groco"}))
    exported, imported = tmp_path / "resnet18.pth", tmp_path / "back" / "latest_model.pth"
    assert export_torchvision.main(["--resume", str(ckpt), "--output", str(exported)]) == 0
    assert import_weights.main(["--weights", str(exported), "--output", str(imported), "--arch", "resnet18"]) == 0
    original, back = load_checkpoint(ckpt)["encoder"], load_checkpoint(imported)["encoder"]
    assert list(back) == [k[len("module."):] for k in original]
    assert all(torch.equal(back[k[len("module."):]], v) for k, v in original.items())


def test_results_table_markdown(tmp_path, capsys):
    for name, weights, final in (
        ("knn_vicreg", {"path": "resnet50.pth", "format": "torchvision"}, {"knn@20_final": 0.6412, "knn@1_final": 0.5}),
        ("lp_groco", {"path": "p/latest_model.pth", "format": "groco"}, {"linear_prob_regular_val_top_1": 0.7}),
    ):
        run = tmp_path / "models" / name / "0101_000000"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"initial": {}, "final": final, "weights": weights}))
        (run / "config.yaml").write_text(yaml.safe_dump({"encoder": {"type": "RegularEncoder",
                                                                     "args": {"arch": "resnet50"}}}))
    assert results_table.main([str(tmp_path / "models")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| run | encoder | weights | format | knn@1_final | knn@20_final | linear_prob_regular_val_top_1 |",
        "|---|---|---|---|---|---|---|",
        "| knn_vicreg/0101_000000 | resnet50 | resnet50.pth | torchvision | 0.5000 | 0.6412 |  |",
        "| lp_groco/0101_000000 | resnet50 | p/latest_model.pth | groco |  |  | 0.7000 |",
    ]
    assert results_table.main([str(tmp_path / "nothing")]) == 2
    assert "no results.json in it or below it" in capsys.readouterr().err
