"""Pre-train an encoder with GroCo (or a SimCLR baseline): parse the command line, load and check
the config, set up the process, build the parts, run. See README.md for the commands."""

from __future__ import annotations

import functools
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import yaml

from data_loader.base import LoaderRuntime
from model.loss import check_batches
from trainer.build import (
    build_evaluations,
    build_loader,
    build_loss,
    build_model,
    build_optimizer,
    check_run_data,
    derived_values,
    steps_per_epoch,
)
from trainer.checkpoint import checkpoint_step
from trainer.cli import print_summary, run_entry
from trainer.loggers import open_sinks
from trainer.precision import make_precision
from trainer.preemption import Preempted
from trainer.run_dir import RunDir, write_json
from trainer.tracking import Tracker, track
from trainer.trainer import Trainer
from utils.config import ConfigError, read_yaml
from utils.files import WriteError
from utils.logging import log_to_file
from utils.optim import cosine_with_warmup
from utils.rng import resolve_seed, seed_everything

log = logging.getLogger("groco")


def main(argv: list[str] | None = None) -> int:
    return run_entry(__doc__, train, argv, training=True)


def train(args, config, exp, checkpoint, proc) -> int:
    seed = resolve_seed(exp.seed)
    data_seed = checkpoint.get("data_seed", seed) if checkpoint else seed
    seed_everything(seed)
    runtime = LoaderRuntime(proc.rank, proc.world_size, data_seed)
    train_loader = build_loader(exp.train_dataloader, runtime)
    if not train_loader.training:
        raise ConfigError("train_dataloader.args: training needs `train: true` and shuffling (a shuffle buffer > 0 "
                          "for web_dataloader), so that every process runs the same number of full batches")
    derived = derived_values(exp, proc.world_size, steps_per_epoch(train_loader, args.dry_run))
    net = build_model(exp, proc)
    loss_fn = build_loss(exp, proc)
    check_batches(loss_fn, train_loader.n_augs, train_loader.global_batch_size)
    optimizer = build_optimizer(exp, net, derived["learning_rate"])
    evaluations = build_evaluations(exp, runtime, proc.distributed)
    precision = make_precision(exp.trainer.mixed_precision, proc.device)
    config = {**config, "derived": derived}
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        print_summary({**derived, "device": str(proc.device), "precision": precision.name, "seed": exp.seed})
        return 0
    check_run_data(evaluations, train_loader)
    schedule = functools.partial(cosine_with_warmup, peak_lr=derived["learning_rate"],
                                 total_steps=derived["total_steps"], warmup_steps=derived["warmup_steps"])
    trainer = Trainer(net, loss_fn, optimizer, schedule, train_loader, evaluations, exp.trainer, precision, proc,
                      None, config, data_seed)
    if checkpoint is not None:
        trainer.restore(checkpoint, args.resume)  # checked whole before the run folder is touched
    run, in_place = open_run_dir(args, config, exp, checkpoint) if proc.is_main else (None, False)
    log.info("derived: %s", derived)
    trainer.attach(run, in_place)
    if run is None:
        trainer.fit(Tracker())
        return 0
    sinks = open_sinks(run.path, config, exp.save_dir, proc.world_size, args.mlflow, args.tensorboard,
                       checkpoint["step"] if in_place else None, tuple(run.read_metrics()) if in_place else ())
    status = "FAILED"
    try:
        results = track(trainer.fit, config["name"], config, run.path, neptune=args.neptune, seed=seed, sinks=sinks)
        write_json(run.results, results)
        if args.results_json:
            write_json(args.results_json, results)
        status = "FINISHED"
    except WriteError as err:  # a full disk: where to continue from, in the same line
        raise WriteError(f"{err}; the last complete checkpoint: {run.last_checkpoint()}") from None
    except (Preempted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        for sink in sinks:
            sink.close(status, (run.results, run.path / "config.yaml") if status == "FINISHED" else ())
    return 0


def open_run_dir(args, config: dict, exp, checkpoint) -> tuple[RunDir, bool]:
    """The run folder and whether the run continues in place. A resume of the newest checkpoint of
    one of our run folders continues there: the log is cut back to the checkpoint, what a killed
    write left is removed, and a changed config is saved beside the old one. Any other resume, of
    an older checkpoint among them, starts a new folder whose config.yaml names the checkpoint
    (`resumed_from`), and the old folder stays as it was."""
    resumed = Path(args.resume) if checkpoint is not None else None
    if resumed is not None and is_run_folder(resumed.parent):
        newer = newer_checkpoint(resumed, checkpoint["step"])
        if newer is None:
            return continue_in_place(resumed.parent, config, checkpoint), True
        log.warning("%s is not its run's newest checkpoint (%s is): continuing in a new run folder, and %s "
                    "stays as it is", resumed, newer.name, resumed.parent)
    run = RunDir.create(exp.save_dir, config["name"])
    run.write_config({**config, "resumed_from": str(resumed)} if resumed else config)
    log_to_file(run.log)
    log.info("run folder %s", run.path)
    return run, False


def is_run_folder(folder: Path) -> bool:
    """One of this repository's run folders (its config.yaml holds the derived values), not a
    folder of released weights."""
    config = folder / "config.yaml"
    return (folder / "metrics.jsonl").is_file() or (config.is_file() and "derived" in read_yaml(config))


def newer_checkpoint(path: Path, step: int) -> Path | None:
    """A checkpoint in `path`'s folder saved after more steps than `step`, or None."""
    for other in sorted(path.parent.glob("*.pth")):
        if other.resolve() != path.resolve() and checkpoint_step(other) > step:
            return other
    return None


def continue_in_place(folder: Path, config: dict, checkpoint: dict) -> RunDir:
    run = RunDir(folder)
    run.remove_temporary_files()
    run.truncate_metrics(checkpoint["step"], epoch_recorded=checkpoint.get("unrecorded") is None)
    previous = read_yaml(folder / "config.yaml")
    if "resumed_from" in previous:
        config = {**config, "resumed_from": previous["resumed_from"]}
    if previous != config:
        stamp = datetime.now().strftime("%m%d_%H%M%S")
        os.replace(folder / "config.yaml", folder / f"config.before_{stamp}.yaml")
        run.write_config(config)
    log_to_file(run.log)
    log.info("run folder %s (continued)", run.path)
    return run


if __name__ == "__main__":
    sys.exit(main())
