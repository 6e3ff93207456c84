"""Evaluate an encoder with k-NN or linear probing: the checkpoint's config (`config.yaml` beside
it, else the one inside it) updated by --config; the encoder loaded strictly; every evaluator run
once, in float32 whatever `trainer.mixed_precision` says (as the reference code did).

    python eval.py --config configs/eval_knn.yaml --resume CKPT [--name N] [--gpu 0] [--results-json PATH]
    torchrun --standalone --nproc_per_node=4 eval.py --distributed --world-size 4 \\
        --config configs/eval_linear_probing.yaml --resume CKPT -name N
    python eval.py --config CONFIG --weights FILE [--weights-format auto|groco|torchvision|dino|moco|...]

`--weights` evaluates the encoder of the config's `encoder` block with the weights of another
method's checkpoint (trainer/weights.py: the formats, how they are told apart, strict loading).
`results.json` records the weights file and its format under `weights`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import yaml

from data_loader.base import LoaderRuntime
from trainer.build import build_encoder, build_evaluations, check_run_data
from trainer.checkpoint import load_module_state
from trainer.cli import print_summary, run_entry
from trainer.precision import make_precision
from trainer.run_dir import RunDir, write_json
from trainer.tracking import Tracker, track
from trainer.weights import load_weights
from utils.config import ConfigError
from utils.logging import log_to_file
from utils.rng import seed_everything
from utils.schema import loader_blocks

log = logging.getLogger("groco")


def main(argv: list[str] | None = None) -> int:
    return run_entry(__doc__, evaluate, argv, training=False)


def evaluate(args, config, exp, checkpoint, proc) -> int:
    """Build the encoder and the evaluators, check them, then run every evaluator once."""
    if not exp.evaluator:
        raise ConfigError("evaluator: eval.py needs at least one evaluator in the config")
    seed = exp.seed if exp.seed is not None else 0
    seed_everything(seed)
    encoder = build_encoder(exp).to(proc.device)
    weights = None  # what results.json records: the file and its format
    if args.weights:
        trunk = load_weights(encoder, args.weights, args.weights_format,
                             target=f"the config's encoder {json.dumps(exp.encoder)}")
        weights = {"path": str(args.weights), "format": trunk.format}
    elif checkpoint is not None:
        load_module_state(encoder, checkpoint["encoder"], f"{args.resume}: encoder")
        weights = {"path": str(args.resume), "format": "groco"}
        if isinstance(checkpoint.get("imported_from"), dict):  # pretrained/import_weights.py
            weights["imported_from"] = checkpoint["imported_from"]
            log.info("encoder loaded from %s (imported from %s)", args.resume, checkpoint["imported_from"])
        else:
            log.info("encoder loaded from %s (epoch %s done)", args.resume, checkpoint.get("epoch"))
    else:
        log.warning("no --resume or --weights: evaluating a randomly initialised encoder")
    evaluations = build_evaluations(exp, LoaderRuntime(proc.rank, proc.world_size, seed), proc.distributed)
    precision = make_precision(False, proc.device)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        print_summary(dry_run_summary(exp, evaluations, proc, precision))
        return 0
    check_run_data(evaluations)
    run = RunDir.create(exp.save_dir, config["name"]) if proc.is_main else None
    if run is not None:
        run.write_config(config)
        log_to_file(run.path / "eval.log")
        log.info("run folder %s", run.path)
    if run is not None:
        metrics = track(lambda tracker: run_evaluations(evaluations, encoder, proc, precision, tracker),
                        config["name"], config, run.path, neptune=args.neptune, seed=seed)
    else:
        metrics = run_evaluations(evaluations, encoder, proc, precision, Tracker())
    results = {"initial": {}, "final": metrics, "weights": weights}
    if run is not None:
        write_json(run.results, results)
        if args.results_json:
            write_json(args.results_json, results)
    return 0


def run_evaluations(evaluations, encoder, proc, precision, tracker: Tracker) -> dict[str, float]:
    """Every evaluator once (a stand-alone evaluation: `epoch=None`); their metrics, logged."""
    metrics: dict[str, float] = {}
    for ev in evaluations:
        start = time.perf_counter()
        metrics.update(ev.evaluator.evaluate(encoder, ev.train_loader, ev.val_loader, proc.device, precision.autocast))
        log.info("%s took %.1f s", type(ev.evaluator).__name__, time.perf_counter() - start)
    for name, value in metrics.items():
        log.info("%s: %.4f", name, value)
    tracker.log_metrics(metrics, step=0)
    return metrics


def dry_run_summary(exp, evaluations, proc, precision) -> dict:
    """What the evaluation would do: its evaluators, the k-NN search and the probe heads' settings."""
    probes = [s for ev in evaluations for s in getattr(ev.evaluator, "settings", [])]
    knn = [ev.evaluator.plan(proc.device) for ev in evaluations if hasattr(ev.evaluator, "plan")]
    return {
        "evaluators": [type(ev.evaluator).__name__ for ev in evaluations],
        "batch_size_per_process": {
            path: (block.get("args") or {}).get("batch_size", 0) // proc.world_size
            for path, block in loader_blocks(exp)
        },
        "knn": knn or None,
        "learning_rate": [p.base_learning_rate * p.batch_size / 256 for p in probes] or None,
        "epochs": [p.epochs for p in probes] or None,
        "loss": "CrossEntropy" if probes else None,
        "encoder": exp.encoder,
        "device": str(proc.device),
        "precision": precision.name,
    }


if __name__ == "__main__":
    sys.exit(main())
