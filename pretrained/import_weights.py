"""Convert another method's checkpoint (or a torchvision / timm ResNet state dict) into this
project's checkpoint format, with a `config.yaml` beside it; `eval.py --resume` then evaluates it.

    python pretrained/import_weights.py --weights swav_800ep_pretrain.pth.tar \\
        --output pretrained/swav_800ep/latest_model.pth [--weights-format auto] [--arch resnet50 | --config C]

The formats and how they are told apart: `trainer/weights.py` (as `eval.py --weights`). The
encoder is the `encoder` block of `--config`, else `RegularEncoder` with `--arch`, else the ResNet
the file's keys and shapes describe (blocks per stage, bottleneck, stem width, 3x3 CIFAR stem).
Loading is strict: only head groups are dropped (logged). The checkpoint holds `encoder`, `config`
and `imported_from` (the file and its format); `config.yaml` holds `--config`'s config (or just
`name` and `encoder`). Neither file may exist yet. Exit status: 0 done, 2 a file that cannot be
imported (one error line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from trainer.build import build_encoder  # noqa: E402
from trainer.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from trainer.weights import CHOICES, choose_format, describe, fit, infer_encoder_block, read_weights, split_trunk  # noqa: E402
from utils.config import ConfigError, load_config  # noqa: E402
from utils.files import WriteError, write_text_atomic  # noqa: E402
from utils.logging import setup_logging  # noqa: E402
from utils.schema import validate  # noqa: E402

log = logging.getLogger("groco")


def convert(weights: Path, name: str = "auto", config: dict | None = None, arch: str | None = None) -> dict:
    """Our checkpoint (`epoch` -1: no training epoch of ours, `step` 0, `encoder`, `config`,
    `imported_from`) from the file `weights`; CheckpointError / ConfigError in one line."""
    state = read_weights(weights)
    trunk = split_trunk(state, choose_format(state, weights, name))
    if config is not None and isinstance(config.get("encoder"), dict):
        block = config["encoder"]
    elif arch is not None:
        block = {"type": "RegularEncoder", "args": {"arch": arch}}
    else:
        block = infer_encoder_block(trunk)
        log.info("architecture from the file's keys and shapes: %s", block)
    config = {"name": "imported", **(config or {}), "encoder": block}
    encoder = build_encoder(validate(config, training=False))
    encoder_state = fit(trunk, encoder, str(weights))
    log.info("%s: %s", weights, describe(trunk))
    return {"epoch": -1, "step": 0, "encoder": encoder_state, "config": config,
            "imported_from": {"path": str(weights), "format": trunk.format}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--weights", type=Path, required=True, help="the file to import")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the checkpoint to write (config.yaml beside)")
    parser.add_argument("--weights-format", default="auto", choices=CHOICES,
                        help="the layout of the file (default auto: told by its structure)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--arch", help="RegularEncoder architecture, e.g. resnet50 (default: read from the file)")
    group.add_argument("-c", "--config", help="a config whose encoder block (and the rest) the checkpoint gets")
    args = parser.parse_args(argv)
    setup_logging()
    beside = args.output.parent / "config.yaml"
    try:
        for path in (args.output, beside):
            if path.exists():
                raise ConfigError(f"{path} exists already: import into a new folder (each checkpoint needs its own "
                                  f"config.yaml)")
        config = load_config(args.config) if args.config else None
        checkpoint = convert(args.weights, args.weights_format, config, args.arch)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, args.output)
        write_text_atomic(beside, yaml.safe_dump(checkpoint["config"], sort_keys=False))
    except (CheckpointError, ConfigError) as err:
        log.error("%s", err)
        return 2
    except WriteError as err:
        log.error("%s", err)
        return 1
    log.info("wrote %s and %s: python eval.py --resume %s [--config configs/eval_knn.yaml]", args.output, beside,
             args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
