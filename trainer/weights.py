"""Encoder weights from other methods' checkpoints: read a file (`torch.load(weights_only=True)`),
tell its format by its structure and key prefixes, map its ResNet trunk onto our encoder's keys and
load it strictly. Used by `eval.py --weights` and `pretrained/import_weights.py`.

Formats (`FORMATS`; each names the dict that holds the encoder, the prefix of the ResNet trunk in it,
and the head groups dropped there):

- `groco`: ours and the paper's released checkpoints: `encoder` with `[module.]encoder.conv1.weight`;
- `torchvision`: a plain torchvision or timm ResNet state dict (`conv1.weight`, ..., `fc.*`), at the
  top or under `state_dict` / `model`; VICReg, Barlow Twins and DINO's backbone-only files;
- `dino`: DINO's full checkpoint: the `teacher`'s `[module.]backbone.` (the student is dropped);
- `moco`: MoCo v1/v2: `state_dict` with `module.encoder_q.` (`encoder_k`, the queue dropped);
- `mocov3`: MoCo v3: `state_dict` with `module.base_encoder.` (momentum encoder, predictor dropped);
- `swav`: SwAV: `module.` on the bare ResNet, with `projection_head` and `prototypes`;
- `lightning`: solo-learn and other Lightning checkpoints: `state_dict` with `backbone.`.

A file matches a format when the format's dict holds keys of a ResNet trunk (`conv1.`, `bn1.`,
`layer1.` ... `layer4.`) under its prefix. Loading is strict: every parameter and buffer of the
encoder must be in the file with its shape; keys of the format's heads (fc, projection heads,
predictors, prototypes, momentum encoders, queues) are dropped and logged; any other key is an
error. The one exception: a file with no BatchNorm `num_batches_tracked` at all (saved before torch
kept that counter, as torchvision's own ImageNet weights were) gets zeros, which evaluation never
reads; the log says so.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from model.encoder import RESNET_LAYOUTS
from trainer.checkpoint import CheckpointError, read_state, unwrap

log = logging.getLogger("groco")

MODEL_PREFIX = "encoder."  # ResNetEncoder holds the torchvision ResNet as `encoder`
TRUNK = r"(conv1|bn1|layer[1-4])\."  # the ResNet's own modules (fc is a head)
COUNTER = "num_batches_tracked"


def _top(state: dict) -> Optional[dict]:
    """The file itself, when it is a flat state dict (every value a tensor)."""
    return state if state and all(isinstance(v, torch.Tensor) for v in state.values()) else None


def _entry(*names: str) -> Callable[[dict], Optional[dict]]:
    def get(state: dict) -> Optional[dict]:
        for name in names:
            if isinstance(state.get(name), dict):
                return state[name]
        return None
    return get


def _first(*getters: Callable[[dict], Optional[dict]]) -> Callable[[dict], Optional[dict]]:
    def get(state: dict) -> Optional[dict]:
        for getter in getters:
            found = getter(state)
            if found is not None and found:
                return found
        return None
    return get


# Head groups of a Lightning module (solo-learn, lightly, ...): top-level attributes whose name
# says head, memory or momentum copy.
LIGHTNING_HEAD = re.compile(r"^(?!backbone\.)([A-Za-z0-9_]*(proj|pred|classif|prototype|head|queue|momentum|memory|"
                            r"center|teacher|target)[A-Za-z0-9_]*)(\.|$)")


@dataclasses.dataclass(frozen=True)
class Format:
    """Where a format keeps the encoder: `container(state)` is the dict holding it (None when the
    file has none), `trunk` the regex of the trunk's prefix there, `heads` the groups dropped
    (label: regex on the container's keys; a label `{0}` is named by the regex's first group),
    `others` the file's other top-level entries that are networks, dropped whole."""

    name: str
    description: str
    container: Callable[[dict], Optional[dict]]
    trunk: str
    heads: tuple[tuple[str, str], ...] = ()
    others: tuple[str, ...] = ()

    def holds(self, state: dict) -> bool:
        """Whether the file has this format's structure: a ResNet trunk under its prefix."""
        found = self.container(state)
        if found is None:
            return False
        pattern = re.compile(f"^{self.trunk}{TRUNK}")
        return any(isinstance(k, str) and pattern.match(k) for k in found)


FORMATS = {f.name: f for f in (
    Format("groco", "ours and the paper's released checkpoints (`encoder`)", _entry("encoder"),
           r"(module\.)?encoder\.", others=("projection",)),
    Format("torchvision", "a plain torchvision / timm ResNet state dict", _first(_top, _entry("state_dict", "model")),
           "", heads=(("classifier fc", r"fc\."),)),
    Format("dino", "DINO's full checkpoint: the teacher", _entry("teacher"), r"(module\.)?backbone\.",
           heads=(("teacher head", r"(module\.)?head\."), ("backbone fc", r"(module\.)?backbone\.fc\.")),
           others=("student", "dino_loss")),
    Format("moco", "MoCo v1/v2 (`state_dict`, `encoder_q`)", _entry("state_dict"), r"(module\.)?encoder_q\.",
           heads=(("projection head encoder_q.fc", r"(module\.)?encoder_q\.fc\."),
                  ("momentum encoder encoder_k", r"(module\.)?encoder_k\."),
                  ("queue", r"(module\.)?queue(_ptr)?$"))),
    Format("mocov3", "MoCo v3 (`state_dict`, `base_encoder`)", _entry("state_dict"), r"(module\.)?base_encoder\.",
           heads=(("projection head base_encoder.fc", r"(module\.)?base_encoder\.(fc|head)\."),
                  ("momentum encoder", r"(module\.)?momentum_encoder\."),
                  ("predictor", r"(module\.)?predictor\."))),
    Format("swav", "SwAV (`module.` on the bare ResNet)", _first(_top, _entry("state_dict")), r"module\.",
           heads=(("projection head", r"module\.projection_head\."), ("prototypes", r"module\.prototypes\d*\."))),
    Format("lightning", "solo-learn / Lightning (`state_dict`, `backbone.`)", _entry("state_dict"), r"backbone\.",
           heads=(("backbone fc", r"backbone\.fc\."), ("{0}", LIGHTNING_HEAD.pattern))),
)}
ALIASES = {"ours": "groco", "timm": "torchvision", "vicreg": "torchvision", "barlowtwins": "torchvision",
           "mocov1": "moco", "mocov2": "moco", "solo-learn": "lightning"}
CHOICES = ("auto", *FORMATS, *ALIASES)


@dataclasses.dataclass
class Trunk:
    """A file's encoder in torchvision's key names (`conv1.weight`), with each key's name in the
    file, what was dropped (group label: number of tensors) and what fits nowhere."""

    format: str
    tensors: OrderedDict
    sources: dict
    dropped: dict
    unexpected: list
    filled: list = dataclasses.field(default_factory=list)  # num_batches_tracked keys filled with zeros


def read_weights(path: str | Path) -> dict:
    """The file's contents, read to the CPU without executing anything; CheckpointError in one line
    when absent, unreadable, needing a type not allowed, or not a dict."""
    state = read_state(path, "weights file")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a weights file: it holds a {type(state).__name__}, not a dict of "
                              f"state dicts")
    return state


def choose_format(state: dict, path: str | Path, name: str = "auto") -> Format:
    """The format `name` (checked: the file must have its structure), or with `auto` the one format
    whose structure the file has; CheckpointError for none, or for several (ambiguous)."""
    if name != "auto":
        fmt = FORMATS.get(ALIASES.get(name, name))
        if fmt is None:
            raise CheckpointError(f"--weights-format {name}: unknown; known: {', '.join(CHOICES)}")
        if not fmt.holds(state):
            raise CheckpointError(f"{path} is not a {fmt.name} file ({fmt.description}): {structure(state)}")
        return fmt
    found = [f for f in FORMATS.values() if f.holds(state)]
    if not found:
        raise CheckpointError(f"{path}: unknown structure, no ResNet encoder in a known layout ({structure(state)}); "
                              f"known formats: {', '.join(FORMATS)}")
    if len(found) > 1:
        raise CheckpointError(f"{path} is ambiguous: it fits the formats {', '.join(f.name for f in found)}; "
                              f"choose one with --weights-format")
    return found[0]


def structure(state: dict) -> str:
    """A short description of a file: its top-level keys and the first keys of its dicts."""
    keys = [str(k) for k in state]
    parts = [f"top-level keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"]
    for name, value in state.items():
        if isinstance(value, dict) and value and len(parts) < 4:
            inner = [str(k) for k in value][:3]
            parts.append(f"{name}: {inner}{' ...' if len(value) > 3 else ''}")
    return "; ".join(parts)


def split_trunk(state: dict, fmt: Format) -> Trunk:
    """The file's trunk under torchvision's key names, its dropped head groups and its keys that fit
    nowhere (not yet compared with an encoder)."""
    container = fmt.container(state)
    heads = [(label, re.compile(f"^{pattern}")) for label, pattern in fmt.heads]
    trunk = re.compile(f"^{fmt.trunk}")
    tensors, sources, dropped, unexpected = OrderedDict(), {}, {}, []
    for key, value in container.items():
        head = next(((label, m) for label, pattern in heads if (m := pattern.match(str(key)))), None)
        if head is not None:
            label = head[0].format(*head[1].groups()) if "{0}" in head[0] else head[0]
            dropped[label] = dropped.get(label, 0) + 1
            continue
        m = trunk.match(str(key))
        if m is None or not isinstance(value, torch.Tensor):
            unexpected.append(str(key))
            continue
        name = str(key)[m.end():]
        tensors[name], sources[name] = value, str(key)
    for other in fmt.others:
        if other in state and state[other] is not container:
            dropped[other] = count_tensors(state[other])
    return Trunk(fmt.name, tensors, sources, dropped, unexpected)


def count_tensors(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(count_tensors(v) for v in value.values())
    return 0


def fit(trunk: Trunk, encoder: nn.Module, what: str, target: str = "the encoder") -> OrderedDict:
    """The encoder's state dict (its own key names) from `trunk`; CheckpointError in one line naming
    the missing keys, the keys that fit nowhere and the other shapes, in the file's key names."""
    expected = unwrap(encoder).state_dict()
    if any(not k.startswith(MODEL_PREFIX) for k in expected):
        raise CheckpointError(f"{what}: the encoder is not a ResNetEncoder (keys {list(expected)[:3]} ...)")
    want = OrderedDict((k[len(MODEL_PREFIX):], v) for k, v in expected.items())
    given = OrderedDict(trunk.tensors)
    if not any(k.endswith(COUNTER) for k in given):  # saved before torch counted BatchNorm batches
        for k, v in want.items():
            if k.endswith(COUNTER):
                given[k] = torch.zeros_like(v)
                trunk.filled.append(k)
    prefix = source_prefix(trunk)
    missing = [prefix + k for k in want if k not in given]
    extra = [trunk.sources[k] for k in given if k not in want] + trunk.unexpected
    shapes = [f"{trunk.sources.get(k, k)} {list(given[k].shape)} for {list(v.shape)}" for k, v in want.items()
              if k in given and given[k].shape != v.shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", extra)):
        if keys:
            problems.append(f"{label} {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    if shapes:
        problems.append(f"other shapes (file for model): {', '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{what} ({trunk.format}) does not fit {target}: " + "; ".join(problems))
    return OrderedDict((MODEL_PREFIX + k, given[k]) for k in want)


def source_prefix(trunk: Trunk) -> str:
    """The trunk's prefix in the file (`module.encoder_q.`), for naming missing keys as the file would."""
    for name, source in trunk.sources.items():
        return source[: len(source) - len(name)]
    return ""


def describe(trunk: Trunk) -> str:
    """One line for the log: the format and the groups dropped."""
    fmt = FORMATS[trunk.format]
    dropped = ", ".join(f"{label} ({n} tensor{'s' if n != 1 else ''})" for label, n in trunk.dropped.items())
    text = (f"format {fmt.name} ({fmt.description}); {len(trunk.tensors)} encoder tensors; "
            f"dropped: {dropped or 'nothing'}")
    if trunk.filled:
        text += f"; {len(trunk.filled)} BatchNorm {COUNTER} absent from the file, set to 0"
    return text


def encoder_state(path: str | Path, encoder: nn.Module, name: str = "auto",
                  target: str = "the encoder") -> tuple[OrderedDict, Trunk]:
    """Read `path`, choose its format (`name`, or detected), map and check it against `encoder`
    (called `target` in errors): the encoder's state dict and the trunk (format, dropped groups).
    CheckpointError in one line."""
    state = read_weights(path)
    trunk = split_trunk(state, choose_format(state, path, name))
    return fit(trunk, encoder, str(path), target), trunk


def load_weights(encoder: nn.Module, path: str | Path, name: str = "auto", target: str = "the encoder") -> Trunk:
    """`encoder_state`, loaded into `encoder` and logged."""
    state, trunk = encoder_state(path, encoder, name, target)
    unwrap(encoder).load_state_dict(state)
    log.info("encoder weights from %s: %s", path, describe(trunk))
    return trunk


def infer_encoder_block(trunk: Trunk) -> dict:
    """The `encoder` config block of the ResNet the trunk's keys and shapes describe (blocks per
    stage, bottleneck or not, stem width, 3x3 CIFAR stem); CheckpointError when none fits."""
    t = trunk.tensors
    if "conv1.weight" not in t:
        raise CheckpointError("cannot tell the architecture: the file has no conv1.weight; give --arch or --config")
    blocks = [len({k.split(".")[1] for k in t if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = "layer1.0.conv3.weight" in t
    arch = next((name for name, (block, layers) in RESNET_LAYOUTS.items()
                 if list(layers) == blocks and (block.__name__ == "Bottleneck") == bottleneck), None)
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(f"cannot tell the architecture: stages of {blocks} {kind} blocks is no ResNet known here"
                              f" ({', '.join(RESNET_LAYOUTS)}); give --arch or --config")
    conv1 = t["conv1.weight"]
    args: dict = {"arch": arch}
    if conv1.shape[0] != 64:
        args["width"] = int(conv1.shape[0])
    if conv1.shape[-1] == 3:
        args["cifar_stem"] = True
    return {"type": "RegularEncoder", "args": args}
