"""Loading checkpoints with `torch.load(weights_only=True)`, the legacy format included: what loads,
what is refused in one line, and that a refused file runs none of its code."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.rng import rng_state, set_rng_state

from .conftest import run_eval

FORMATS = ["legacy", "zip"]


def touch(path: str) -> None:
    """What a crafted checkpoint makes the unpickler call: proof that the file's code ran."""
    Path(path).touch()


class PaperConfig:
    """A config object of a class that is not allowed (any class but argparse.Namespace)."""

    def __init__(self, **values):
        self.__dict__.update(values)


class RunsCode:
    """Unpickles as a call to `touch(marker)`, as a crafted `__reduce__` would run any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return touch, (str(self.marker),)


def save(state, path: Path, fmt: str) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    assert (path.read_bytes()[:2] == b"PK") == (fmt == "zip")
    return path


def released_like(args: argparse.Namespace) -> dict:
    """What the paper's code saves: DDP keys, SGD state, and a config holding its parsed arguments."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return {"epoch": 99, "step": 125_000, "encoder": {f"module.encoder.{k}": v for k, v in net.state_dict().items()},
            "projection": {"module.projection.0.weight": torch.randn(8, 4)}, "optimizer": optimizer.state_dict(),
            "config": {"name": "2views_100ep", "args": args}}


def one_line_refusal(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_released_format_with_a_namespace_loads(tmp_path, fmt):
    """The Namespace is allowed for that one load only, not for the process."""
    args = argparse.Namespace(arch="resnet50", lr=0.75, views=[224, 224])
    state = released_like(args)
    path = save(state, tmp_path / "latest_model.pth", fmt)
    loaded = load_checkpoint(path)
    assert loaded["config"]["args"] == args and loaded["epoch"] == 99 and loaded["step"] == 125_000
    for key in ("encoder", "projection"):
        assert loaded[key].keys() == state[key].keys()
        for name, value in state[key].items():
            assert torch.equal(loaded[key][name], value)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, entry in state["optimizer"]["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][i]["momentum_buffer"], entry["momentum_buffer"])
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_another_type_is_refused_without_running_its_code(tmp_path, fmt):
    marker = tmp_path / "code_ran"
    state = {"epoch": 0, "encoder": {}, "config": {"args": RunsCode(marker)}}
    path = save(state, tmp_path / "crafted.pth", fmt)
    message = one_line_refusal(path, rf"needs {__name__}\.touch, which a checkpoint may not hold")
    assert "argparse.Namespace" in message and "weights_only=False" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the refusal spares: the file does run code
    assert marker.exists()


def test_the_readme_conversion_makes_a_refused_file_load(tmp_path):
    """README, "Released checkpoints and results": load in full once, save the config as a dict."""
    old = save({"epoch": 0, "encoder": {}, "config": PaperConfig(name="2views_100ep")}, tmp_path / "old.pth", "legacy")
    one_line_refusal(old, rf"needs {__name__}\.PaperConfig")
    state = torch.load(old, weights_only=False)
    torch.save({**state, "config": vars(state["config"])}, tmp_path / "new.pth")
    assert load_checkpoint(tmp_path / "new.pth")["config"] == {"name": "2views_100ep"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cut_file_is_refused_without_running_its_code(tmp_path, fmt):
    """Cut anywhere in the pickled objects or in the tensor data. Past the objects a full unpickler
    would run their code before noticing the end of the file; cut inside a global's name, the
    refusal is not "needs" a cut name."""
    marker = tmp_path / "code_ran"
    state = {"epoch": 0, "encoder": {"w": torch.randn(256, 256)}, "config": {"args": RunsCode(marker)}}
    whole = save(state, tmp_path / "whole.pth", fmt).read_bytes()
    sizes = [*range(0, 1500, 7), len(whole) // 2, len(whole) - 1]
    path = tmp_path / "cut.pth"
    messages = set()
    for size in sizes:
        path.write_bytes(whole[:size])
        message = one_line_refusal(path, "is not a readable checkpoint|needs ")
        assert "needs " not in message or f"needs {__name__}.touch," in message, (size, message)
        assert not marker.exists(), size
        messages.add(message.split(" (")[0].split(",")[0].replace(str(path), "FILE"))
    whole_objects = {f"FILE needs {__name__}.touch"} if fmt == "legacy" else set()  # a zip is read from its end
    assert messages == {"FILE is not a readable checkpoint", *whole_objects}, messages


def test_a_text_file_is_refused_without_running_its_code(tmp_path):
    """Pickle's protocol 0 is text: this line calls `touch` when fully unpickled."""
    marker = tmp_path / "code_ran"
    text = tmp_path / "notes.pth"
    text.write_text(f"c{__name__}\ntouch\n(V{marker}\ntR.")
    one_line_refusal(text, rf"needs {__name__}\.touch")
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    plain.write_text("this is not a checkpoint\n")
    one_line_refusal(plain, "is not a readable checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    one_line_refusal(empty, r"is not a readable checkpoint \(EOFError: empty or cut short\)")


def test_our_checkpoint_round_trips_with_the_rng_state(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = {"epoch": 4, "step": 50, "encoder": {"w": torch.randn(3)}, "scaler": {}, "rng": rng_state(),
             "data_seed": 7, "config": {"name": "run", "derived": {"learning_rate": 0.3}}}
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(state, tmp_path / "latest_model.pth")
    loaded = load_checkpoint(tmp_path / "latest_model.pth")
    assert loaded["config"] == state["config"] and loaded["data_seed"] == 7 and loaded["step"] == 50
    set_rng_state(loaded["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_refused_checkpoint_is_one_logged_line_and_exit_2(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = save({"epoch": 0, "encoder": {}, "config": {"args": RunsCode(marker)}}, tmp_path / "crafted.pth", "legacy")
    capsys.readouterr()
    assert run_eval("--resume", path, "--device", "cpu", f"save_dir={tmp_path}") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"needs {__name__}.touch" in errors[0] and "Traceback" not in err, err
    assert not marker.exists()
