"""Evaluate an encoder with k-NN or linear probing (SPEC 6): parse the command line, load the
checkpoint's config (updated by --config), load the encoder strictly, run the evaluators once.
See README.md for the commands."""

from __future__ import annotations

import logging
import sys

import yaml

from data_loader.base import LoaderRuntime
from trainer.checkpoint import load_module_state
from trainer.precision import make_precision
from trainer.run_dir import RunDir, write_json
from trainer.setup import build_encoder, build_evaluations, seed_everything
from utils.cli import print_summary, run_entry
from utils.config import ConfigError
from utils.schema import loader_blocks

log = logging.getLogger("groco")


def main(argv: list[str] | None = None) -> int:
    return run_entry(__doc__, evaluate, argv, training=False)


def evaluate(args, config, exp, checkpoint, proc) -> int:
    if not exp.evaluator:
        raise ConfigError("evaluator: eval.py needs at least one evaluator in the config")
    seed = exp.seed if exp.seed is not None else 0
    seed_everything(seed)
    encoder = build_encoder(exp).to(proc.device)
    if checkpoint is not None:
        load_module_state(encoder, checkpoint["encoder"], f"{args.resume}: encoder")
    else:
        log.warning("no --resume: evaluating a randomly initialised encoder")
    evaluations = build_evaluations(exp, LoaderRuntime(proc.rank, proc.world_size, seed), proc.distributed)
    trainer_settings = exp.trainer.mixed_precision if exp.trainer else False
    precision = make_precision(trainer_settings, proc.device)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        print_summary(dry_run_summary(exp, evaluations, proc, precision))
        return 0
    run = RunDir.create(exp.save_dir, config["name"]) if proc.is_main else None
    if run is not None:
        run.write_config(config)
    metrics: dict[str, float] = {}
    for ev in evaluations:
        metrics.update(ev.evaluator.evaluate(encoder, ev.train, ev.val, proc.device, precision.autocast))
    for name, value in metrics.items():
        log.info("%s: %.4f", name, value)
    results = {"initial": {}, "final": metrics}
    if run is not None:
        write_json(run.results, results)
        if args.results_json:
            write_json(args.results_json, results)
    return 0


def dry_run_summary(exp, evaluations, proc, precision) -> dict:
    """What the evaluation would do: its evaluators and, for probing, the heads' schedule."""
    probes = [s for ev in evaluations for s in getattr(ev.evaluator, "settings", [])]
    return {
        "evaluators": [type(ev.evaluator).__name__ for ev in evaluations],
        "batch_size_per_process": {
            path: (block.get("args") or {}).get("batch_size", 0) // proc.world_size
            for path, block in loader_blocks(exp)
        },
        "learning_rate": [p.base_learning_rate * p.batch_size / 256 for p in probes] or None,
        "epochs": [p.epochs for p in probes] or None,
        "loss": "CrossEntropy" if probes else None,
        "device": str(proc.device),
        "precision": precision.name,
    }


if __name__ == "__main__":
    sys.exit(main())
