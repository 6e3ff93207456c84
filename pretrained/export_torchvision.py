"""Export a checkpoint's encoder as a plain torchvision ResNet state dict.

    python pretrained/export_torchvision.py --resume pretrained/2views_100ep/latest_model.pth \\
        --output resnet50_groco_2views_100ep.pth

Keys `[module.]encoder.conv1.weight` become `conv1.weight`; the architecture (from `config.yaml`
beside the checkpoint, else the config inside it) must be torchvision's (width 64, standard stem).
The file is written atomically once it loads into `torchvision.models.<arch>()` with exactly `fc`
missing: `model.load_state_dict(torch.load("OUT.pth"), strict=False)`. Exit status: 0 done, 2 a
checkpoint or config that cannot be exported (one error line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import OrderedDict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision.models as tvm  # noqa: E402

from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, strip_module_prefix  # noqa: E402
from utils.config import ConfigError, read_yaml  # noqa: E402
from utils.logging import setup_logging  # noqa: E402

log = logging.getLogger("groco")

ENCODER_PREFIX = "encoder."
ONLY_MISSING = ["fc.weight", "fc.bias"]


def encoder_config(checkpoint: dict, path: Path) -> dict:
    """The `encoder` block of the run: from `config.yaml` beside the checkpoint, else from inside it."""
    beside = path.parent / "config.yaml"
    config = read_yaml(beside) if beside.is_file() else checkpoint.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("encoder"), dict):
        raise CheckpointError(f"{path}: no encoder config (neither a config.yaml beside it nor a config inside it)")
    return config["encoder"]


def torchvision_arch(block: dict) -> str:
    """The torchvision model name of an encoder block; ConfigError when it is not a torchvision ResNet."""
    args = block.get("args") or {}
    arch = args.get("arch")
    if block.get("type") not in ("RegularEncoder", "ResNetEncoder") or not isinstance(arch, str):
        raise ConfigError(f"encoder: {block.get('type')!r} with arch {arch!r} is not a torchvision ResNet encoder")
    if args.get("width", 64) != 64 or args.get("cifar_stem", False):
        raise ConfigError(f"encoder.args: width {args.get('width', 64)}, cifar_stem {args.get('cifar_stem', False)} "
                          f"is not a torchvision architecture (needs width 64 and the standard stem)")
    if not hasattr(tvm, arch):
        raise ConfigError(f"encoder.args.arch: torchvision has no model {arch!r}")
    return arch


def torchvision_state_dict(encoder_state: dict) -> OrderedDict:
    """Encoder state dict (`[module.]encoder.conv1.weight`) -> torchvision's (`conv1.weight`)."""
    stripped = strip_module_prefix(encoder_state)
    foreign = [k for k in stripped if not k.startswith(ENCODER_PREFIX)]
    if foreign:
        raise CheckpointError(f"encoder keys without the '{ENCODER_PREFIX}' prefix: {foreign[:5]}")
    return OrderedDict((k[len(ENCODER_PREFIX):], v) for k, v in stripped.items())


def check_loads(state: dict, arch: str) -> None:
    """Load into `torchvision.models.<arch>()`: only fc may be missing, nothing unexpected."""
    result = getattr(tvm, arch)().load_state_dict(state, strict=False)
    if sorted(result.missing_keys) != sorted(ONLY_MISSING) or result.unexpected_keys:
        raise CheckpointError(f"the encoder does not fit torchvision's {arch}: missing {result.missing_keys[:10]}, "
                              f"unexpected {result.unexpected_keys[:10]}")


def export(resume: Path, output: Path) -> str:
    """Read `resume`, convert, check and write `output`; returns the architecture's name."""
    checkpoint = load_checkpoint(resume)
    arch = torchvision_arch(encoder_config(checkpoint, resume))
    state = torchvision_state_dict(checkpoint["encoder"])
    check_loads(state, arch)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, output)
    return arch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--resume", type=Path, required=True, help="checkpoint (ours or a released one)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the torchvision state dict")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        arch = export(args.resume, args.output)
    except (CheckpointError, ConfigError) as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s: torchvision %s weights (load with strict=False; only fc is missing)", args.output, arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
