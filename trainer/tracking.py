"""Experiment tracking with Sacred, as in the paper's code, and the epoch summary line.

`track` runs a job as a Sacred run's main function (Sacred's public API then records the start,
the end and any failure), observed by a `FileStorageObserver` in `run_dir/sacred/1/` (`run.json`,
`config.json`, `metrics.json`; the sources in `run_dir/sacred/_sources/`) and, with
`neptune=True`, by Neptune (credentials from NEPTUNE_API_TOKEN and NEPTUNE_PROJECT).
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import humanize
import psutil
import torch

from trainer.preemption import Preempted
from utils.config import ConfigError
from utils.files import write_error
from utils.rng import rng_state, set_rng_state

with warnings.catch_warnings():
    # sacred 0.8.7 imports pkg_resources, which warns on import; nothing a user can act on
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from sacred import Experiment
    from sacred.observers import FileStorageObserver
    from sacred.run import Run
    from sacred.utils import SacredInterrupt

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
SOURCE_GLOBS = ("*.py", "model/*.py", "trainer/*.py", "data_loader/*.py", "utils/*.py")  # the code a run ran
NEPTUNE_VARIABLES = {"NEPTUNE_API_TOKEN": "your Neptune API token", "NEPTUNE_PROJECT": "workspace-name/project-name"}
NEPTUNE_PACKAGES = {"neptune": "neptune", "neptune_sacred": "neptune-sacred"}  # module: pip package
SKIPPED_KEYS = ("step", "epoch")


class TrackingError(ConfigError):
    """Tracking cannot start as asked (missing credentials or packages); nothing was started."""


class _Stopped(SacredInterrupt):
    """A run stopped on request (`Preempted`), which Sacred records INTERRUPTED, not FAILED."""

    STATUS = "INTERRUPTED"

    def __init__(self, cause: Preempted):
        super().__init__(str(cause))
        self.cause = cause


class Tracker:
    """Where metrics go: a Sacred run (and its observers), or nowhere (`Tracker()`); and the sinks
    beside it (trainer/loggers.py: MLflow, TensorBoard), which take each call's scalars at once."""

    def __init__(self, run: Optional[Run] = None, sinks: Sequence = ()):
        self._run = run
        self.sinks = list(sinks)

    @property
    def active(self) -> bool:
        return self._run is not None or bool(self.sinks)

    def log_scalar(self, name: str, value: float, step: int) -> None:
        if self._run is not None:
            self._run.log_scalar(name, float(value), int(step))
        for sink in self.sinks:
            sink.log_metrics({name: float(value)}, step)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "",
                    global_step: Optional[int] = None) -> None:
        """Log every finite number in `metrics` as `prefix + name` at `step`, except flags and the
        `step` and `epoch` entries; the sinks take them at `global_step` when given (the optimisation
        steps done, for an epoch's record), else at `step`."""
        values = {prefix + name: value for name, value in loggable(metrics).items()}
        if self._run is not None:
            for name, value in values.items():
                self._run.log_scalar(name, float(value), int(step))
        for sink in self.sinks:
            sink.log_metrics(values, step if global_step is None else global_step)


def loggable(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics`, except flags and the `step` and `epoch` entries."""
    return {name: value for name, value in metrics.items()
            if name not in SKIPPED_KEYS and not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value)}


def check_neptune(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The Neptune API token and project from the environment; TrackingError naming what is missing
    (variables, packages) otherwise. Imports nothing."""
    problems = []
    missing = [name for name in NEPTUNE_VARIABLES if not environ.get(name)]
    if missing:
        problems.append("set " + " and ".join(f"{name} ({NEPTUNE_VARIABLES[name]})" for name in missing)
                        + " in the environment")
    absent = [package for module, package in NEPTUNE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if absent:
        problems.append(f"install {' and '.join(absent)}: pip install {' '.join(NEPTUNE_PACKAGES.values())}")
    if problems:
        raise TrackingError("--neptune: " + "; ".join(problems))
    return environ["NEPTUNE_API_TOKEN"], environ["NEPTUNE_PROJECT"]


def track(job: Callable[[Tracker], T], name: str, config: dict, run_dir: str | Path, neptune: bool = False,
          seed: Optional[int] = None, environ: Mapping[str, str] = os.environ, sinks: Sequence = ()) -> T:
    """`job(tracker)`'s result, run as a Sacred run recorded in `run_dir/sacred` (and on Neptune when
    asked); its exceptions propagate, marking the run FAILED (INTERRUPTED for KeyboardInterrupt and
    `Preempted`). `seed` is recorded as Sacred's (default: the config's); the generators' state is put
    back after Sacred re-seeds them, so a tracked run computes what an untracked one does. `sinks`
    (trainer/loggers.py) take the same scalars beside Sacred.
    TrackingError when Neptune cannot start; WriteError when Sacred cannot write its first records."""
    credentials = check_neptune(environ) if neptune else None
    experiment = Experiment(name, base_dir=str(ROOT), save_git_info=False)
    experiment.logger = _sacred_logger(name)
    for pattern in SOURCE_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            experiment.add_source_file(str(path))
    sacred_config = dict(config)
    if seed is not None:
        sacred_config["seed"] = seed
    experiment.add_config(sacred_config)
    experiment.observers.append(FileStorageObserver(str(Path(run_dir) / "sacred")))
    neptune_run = _start_neptune(experiment, name, *credentials) if credentials else None
    state, started = rng_state(), []

    def main(_run):
        started.append(True)
        set_rng_state(state)
        try:
            return job(Tracker(_run, sinks))
        except Preempted as err:
            raise _Stopped(err) from err

    experiment.main(main)
    try:
        return experiment.run(options={"--capture": "no"}).result
    except _Stopped as stop:
        raise stop.cause from None
    except OSError as err:
        if started:  # the job's own error
            raise
        # Sacred's first records (later ones it only warns about): a full disk is one line as elsewhere
        raise write_error(Path(err.filename or Path(run_dir) / "sacred"), err) from None
    finally:
        if neptune_run is not None:
            neptune_run.stop()


def _start_neptune(experiment: Experiment, name: str, api_token: str, project: str):
    """A Neptune run observing `experiment` (Neptune honours NEPTUNE_MODE=offline or debug)."""
    import neptune
    from neptune_sacred import NeptuneObserver

    run = neptune.init_run(project=project, api_token=api_token, name=name)
    experiment.observers.append(NeptuneObserver(run=run))
    return run


class _MainProcessRecords(logging.Filter):
    """Gives Sacred's records the `rank` field of the log format (0: tracking runs on rank 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank"):
            record.rank = 0
        return True


MAIN_PROCESS_RECORDS = _MainProcessRecords()


def _sacred_logger(name: str) -> logging.Logger:
    """The project's logger for Sacred, warnings only ('Running command' and the like stay out);
    the filter is added to its child named after the experiment too: Sacred logs there as well."""
    logger = logging.getLogger("groco.sacred")
    logger.setLevel(logging.WARNING)
    for source in (logger, logger.getChild(name)):
        source.addFilter(MAIN_PROCESS_RECORDS)
    return logger


def epoch_summary(seconds: float, samples: int, device: Optional[torch.device] = None) -> str:
    """One line on an epoch's cost: duration, throughput, resident memory and, on a GPU, the peak
    tensor memory since the last `torch.cuda.reset_peak_memory_stats`, e.g. '2 minutes and 5
    seconds, 8 samples/s, host memory 1.2 GiB, GPU peak 3.4 GiB'."""
    parts = [
        humanize.precisedelta(datetime.timedelta(seconds=seconds), minimum_unit="seconds", format="%0.0f"),
        f"{samples / seconds:,.0f} samples/s" if seconds > 0 else "- samples/s",
        f"host memory {humanize.naturalsize(psutil.Process().memory_info().rss, binary=True)}",
    ]
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        parts.append(f"GPU peak {humanize.naturalsize(torch.cuda.max_memory_allocated(device), binary=True)}")
    return ", ".join(parts)
