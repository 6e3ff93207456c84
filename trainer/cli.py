"""The command line shared by train.py and eval.py (docs/reference.md §8) and how it resolves the
config. `--name` is also accepted as `-name`, as the original README's probing example spells it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from trainer.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from trainer.loggers import check_trackers
from trainer.preemption import Preempted, requeue_under_slurm
from trainer.tracking import check_neptune
from trainer.trainer import NonFiniteLossError
from trainer.weights import CHOICES as WEIGHT_FORMATS
from utils.config import ConfigError, apply_overrides, deep_merge, load_config, read_yaml
from utils.dist import DIST_TIMEOUT_S, WAIT_LOG_S, LaunchError, init_process, launch_env, max_over_processes, shutdown
from utils.files import WriteError
from utils.logging import setup_logging
from utils.schema import validate

log = logging.getLogger("groco")


def build_parser(description: str, evaluation: bool = False) -> argparse.ArgumentParser:
    """The options of train.py; with `evaluation` also eval.py's `--weights` and `--weights-format`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--config", help="config file (YAML)")
    p.add_argument("-r", "--resume", help="checkpoint to continue from (its folder's config.yaml is used), or "
                   "'auto': the newest complete checkpoint of this config's runs, if any")
    p.add_argument("-n", "--neptune", action="store_true", help="also log to a (self-hosted) Neptune server")
    if not evaluation:
        p.add_argument("--mlflow", action="store_true", help="also log to MLflow (MLFLOW_TRACKING_URI, default a "
                       "SQLite file save_dir/mlflow.db)")
        p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events in the run folder")
    p.add_argument("--name", "-name", help="run name (default: the config file's name)")
    p.add_argument("--distributed", action="store_true", help="one process per GPU under torchrun or srun")
    p.add_argument("--world-size", type=int, default=1, help="number of processes (with --distributed)")
    p.add_argument("--dist-url", default="env://", help="process-group rendezvous (default env://)")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                   help=f"seconds a process waits for the others to join before it gives up (default "
                        f"{DIST_TIMEOUT_S}); it says it is waiting every {WAIT_LOG_S} s, or every quarter of "
                        f"the timeout when that is shorter")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default; the CPU is used when no GPU is found) or cpu")
    p.add_argument("--gpu", type=int, help="GPU index for a single-process run")
    p.add_argument("--epochs", type=int, help="override trainer.epochs")
    p.add_argument("--init_val", type=int, choices=[0, 1], help="override trainer.init_val")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, read no data, print the settings and a JSON summary, exit")
    p.add_argument("--results-json", type=Path, help="write the run's metrics to this JSON file")
    if evaluation:
        p.add_argument("--weights", help="evaluate the config's encoder with the weights of this file: another "
                       "method's checkpoint or a ResNet state dict (not with --resume)")
        p.add_argument("--weights-format", default="auto", choices=WEIGHT_FORMATS,
                       help="the layout of the --weights file (default auto: told by its structure)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override any config value")
    return p


# flags that set a config key: (flag, its attribute in the parsed arguments, the key)
FLAG_KEYS = (("--epochs", "epochs", "trainer.epochs"), ("--init_val", "init_val", "trainer.init_val"),
             ("--name", "name", "name"))


def check_flags(args: argparse.Namespace) -> None:
    """ConfigError for flags that contradict each other, rather than letting one silently win:
    launch settings without --distributed, --gpu with --device cpu or --distributed, and a flag
    together with an override of the config key it sets."""
    if not args.distributed:
        launch = (("--world-size", args.world_size, 1), ("--dist-url", args.dist_url, "env://"),
                  ("--dist-timeout", args.dist_timeout, DIST_TIMEOUT_S))
        for flag, value, default in launch:
            if value != default:
                raise ConfigError(f"{flag} {value} needs --distributed: without it the run is one process")
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout {args.dist_timeout}: a number of seconds above 0")
    if args.gpu is not None and args.device == "cpu":
        raise ConfigError(f"--gpu {args.gpu} contradicts --device cpu: give one of them")
    if args.gpu is not None and args.distributed:
        raise ConfigError(f"--gpu {args.gpu} contradicts --distributed: each process takes the GPU of its local rank")
    weights = getattr(args, "weights", None)
    if weights and args.resume:
        raise ConfigError(f"--weights {weights} and --resume {args.resume} are exclusive: give one of them")
    if getattr(args, "weights_format", "auto") != "auto" and not weights:
        raise ConfigError(f"--weights-format {args.weights_format} needs --weights")
    if weights and not args.config:
        raise ConfigError(f"--weights {weights} needs --config: its encoder block builds the encoder")
    overridden = {item.partition("=")[0]: item for item in args.overrides}
    for flag, attr, key in FLAG_KEYS:
        if getattr(args, attr) is not None and key in overridden:
            raise ConfigError(f"{flag} {getattr(args, attr)} and the override {overridden[key]} both set {key}: "
                              f"give one of them")


def resolve_config(args: argparse.Namespace, training: bool = True) -> tuple[dict, Optional[dict]]:
    """The run's config and the checkpoint to resume from (or None). With `--resume`, the config is
    the `config.yaml` beside the checkpoint (else the one inside it) updated by `--config`; the
    overrides apply last. `--resume auto` finding nothing starts a new run when `training`, and is
    a CheckpointError otherwise (it would evaluate a random encoder)."""
    checkpoint = None
    if args.resume == "auto":
        found = find_auto_resume(args, required=not training)  # loaded there, to skip files that do not load
        args.resume, checkpoint = (str(found[0]), found[1]) if found else (None, None)
    elif args.resume:
        checkpoint = load_checkpoint(args.resume)
    if checkpoint is not None:
        beside = Path(args.resume).parent / "config.yaml"
        if beside.is_file():
            config = read_yaml(beside)
        elif isinstance(checkpoint.get("config"), dict):
            config = checkpoint["config"]
        else:
            raise CheckpointError(f"{args.resume}: no config.yaml beside it and no config inside it")
        if args.config:
            config = deep_merge(config, load_config(args.config))
    elif args.config:
        config = load_config(args.config)
    else:
        raise ConfigError("give a config file (--config) or a checkpoint to resume (--resume)")
    config.pop("derived", None)  # recomputed for every run
    config.pop("resumed_from", None)  # a record of the run folder it was read from (train.open_run_dir)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"trainer.epochs={args.epochs}")
    if args.init_val is not None:
        overrides.append(f"trainer.init_val={'true' if args.init_val else 'false'}")
    config = apply_overrides(config, overrides)
    if getattr(args, "weights", None) and not isinstance(config.get("encoder"), dict):
        raise ConfigError("encoder: --weights needs the encoder its weights are for, in the config or as an "
                          "override: 'encoder={type: RegularEncoder, args: {arch: resnet50}}'")
    if args.name:
        config["name"] = args.name
    elif args.config:
        config["name"] = Path(args.config).stem
    config.setdefault("name", "run")
    return config, checkpoint


def find_auto_resume(args: argparse.Namespace, required: bool = False) -> Optional[tuple[Path, dict]]:
    """`--resume auto`: the newest complete checkpoint under save_dir/models/<name> (its path and
    contents), or None; CheckpointError instead of None when one is `required`."""
    if not args.config:
        raise ConfigError("--resume auto needs --config (it looks for the runs of that config)")
    config = apply_overrides(load_config(args.config), list(args.overrides))
    name = args.name or Path(args.config).stem
    runs = Path(config.get("save_dir", "./output")) / "models" / name
    found = find_latest_checkpoint(runs)
    if found is None and required:
        raise CheckpointError(f"--resume auto: no checkpoint under {runs} to evaluate; give one with --resume CKPT")
    if found is None:
        log.info("--resume auto: no checkpoint under %s, starting a new run", runs)
        return None
    log.info("--resume auto: continuing from %s", found[0])
    return found


def print_summary(summary: dict) -> None:
    """The dry run's last line: one JSON object."""
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()


def run_entry(description: str, job: Callable, argv: Optional[list[str]], training: bool) -> int:
    """Parse, resolve and check the config, set up the process, run `job(args, config, exp,
    checkpoint, proc)`. Exit status: 0 finished; 1 a non-finite loss or a failed write; 2 a bad
    config, checkpoint or launch (one logged line, nothing created); 128 + N stopped by signal N."""
    args = build_parser(description, evaluation=not training).parse_intermixed_args(argv)
    launch = launch_env() if args.distributed else None
    setup_logging(launch["rank"] if launch else 0)  # the rank is known before the process group is
    if args.dry_run and args.results_json:
        log.warning("--results-json %s: a dry run has no results and does not write it; its summary is the "
                    "last line of the output", args.results_json)
    try:
        check_flags(args)
        config, checkpoint = resolve_config(args, training)
        exp = validate(config, world_size=args.world_size if args.distributed else 1, training=training)
        if args.neptune:
            check_neptune()  # credentials and packages, before anything starts
        check_trackers(getattr(args, "mlflow", False), getattr(args, "tensorboard", False))
        proc = init_process(args.distributed, args.world_size, args.dist_url, args.device, args.gpu,
                            args.dist_timeout)
        setup_logging(proc.rank)
        if proc.device.type == "cpu":
            log.info("running on the CPU%s", " (no CUDA device found)" if args.device == "cuda" else "")
        code = job(args, config, exp, checkpoint, proc)
        shutdown()
        return code
    except (ConfigError, CheckpointError, LaunchError) as err:
        log.error("%s", err)
        return 2
    except Preempted as err:
        log.warning("%s", err)
        if not launch or launch["rank"] == 0:  # one requeue per job; every process knows the cause
            requeue_under_slurm(err.signum)
        # The same status on every process, also where another process received the signal
        # (signum 0). A collective, so that none exits before the requeue: a status other than 0
        # makes `srun --kill-on-bad-exit` (scripts/slurm) kill the processes still running.
        signum = max_over_processes(err.signum)
        shutdown()
        return 128 + signum
    except (NonFiniteLossError, WriteError) as err:
        log.error("%s", err)
        return 1
