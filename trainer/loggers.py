"""MLflow and TensorBoard beside Sacred (`--mlflow`, `--tensorboard`): sinks that `Tracker` feeds
with the same scalars, on rank 0 only (train.py opens them where the run folder is).

One run across resumes: a run continued in place continues its MLflow run (its id is kept in the
run folder's `mlflow_run.json`) and its TensorBoard events (in the run folder itself, so that
`tensorboard --logdir output/models` shows every run), at the same steps, writing no point twice:
TensorBoard's events from the checkpoint's step on are purged (`purge_step`) and the epoch
records kept in metrics.jsonl at that step are written again; MLflow skips, per metric, the steps
up to the last one it holds. A sink that fails logs one warning and stops; training goes on and
the local records (metrics.jsonl, Sacred) stay complete. The packages are imported only here and
only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("groco")

# flag: (modules it needs, the pip command)
PACKAGES = {
    "--mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install mlflow-skinny sqlalchemy alembic"),
    "--tensorboard": (("tensorboard",), "pip install tensorboard"),
}
MLFLOW_RUN_FILE = "mlflow_run.json"
PARAM_LIMIT = 500  # characters of a parameter value every MLflow store accepts
# what MLflow refuses in a metric's name (`knn@20_online` stopped the MLflow sink at the first k-NN)
MLFLOW_NAME_REFUSED = re.compile(r"[^0-9A-Za-z_\-. :/]")


def check_trackers(mlflow: bool = False, tensorboard: bool = False) -> None:
    """TrackingError naming the pip command for a flag whose package is missing. Imports nothing."""
    from trainer.tracking import TrackingError

    for flag, asked in (("--mlflow", mlflow), ("--tensorboard", tensorboard)):
        modules, command = PACKAGES[flag]
        if asked and any(importlib.util.find_spec(m) is None for m in modules):
            raise TrackingError(f"{flag}: install its package: {command}")


class Sink:
    """A tracker beside Sacred. Subclasses implement `_log` and may implement `_close`."""

    name = "sink"

    def __init__(self):
        self.failed = False

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        if values and not self.failed:
            self._guard(self._log, dict(values), int(step))

    def close(self, status: str = "FINISHED", artifacts: tuple[Path, ...] = ()) -> None:
        if not self.failed:
            self._guard(self._close, status, artifacts)

    def _guard(self, call, *args) -> None:
        try:
            call(*args)
        except Exception as err:  # noqa: BLE001 - a tracker must never stop training
            self.failed = True
            log.warning("%s: logging failed, it stops for this run (training goes on; metrics.jsonl and "
                        "Sacred's records stay complete): %s", self.name, first_line(err))

    def _log(self, values: dict, step: int) -> None:
        raise NotImplementedError

    def _close(self, status: str, artifacts: tuple[Path, ...]) -> None:
        pass


class TensorBoardSink(Sink):
    name = "TensorBoard"

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, replay: tuple[dict, ...] = ()):
        """Events in `run_dir`; `resume_step`: continued in place from a checkpoint at that many steps
        (later events are purged); `replay`: records at that step to write again ({tag: value}, step)."""
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=resume_step)
        for values, step in replay:
            self.log_metrics(values, step)

    def _log(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def _close(self, status: str, artifacts: tuple[Path, ...]) -> None:
        self.writer.close()


class MlflowSink(Sink):
    name = "MLflow"

    def __init__(self, run_dir: Path, save_dir: str | Path, config: dict, world_size: int,
                 environ: Mapping[str, str] = os.environ):
        """The run's MLflow run: the one recorded in `run_dir` if any (a resume), else a new one with
        the flattened config as parameters. Store: MLFLOW_TRACKING_URI, else a SQLite file under
        `save_dir`."""
        super().__init__()
        from mlflow.tracking import MlflowClient

        server = environ.get("MLFLOW_TRACKING_URI")
        if server:
            bound_http_retries()
        self.uri = server or f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"
        # the local store's artifacts beside it (MLflow's default is ./mlruns of the working directory)
        artifacts = None if server else (Path(save_dir).resolve() / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.record = Path(run_dir) / MLFLOW_RUN_FILE
        self.last_steps: dict[str, int] = {}
        self.run_id = self._continued_run()
        params = flatten(config)
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(config["name"])
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(config["name"], artifact_location=artifacts))
            tags = {"config_name": config["name"], "world_size": str(world_size), "run_dir": str(run_dir)}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = tags["git_commit"] = commit
            run = self.client.create_run(experiment_id, tags=tags, run_name=Path(run_dir).name)
            self.run_id = run.info.run_id
            self.record.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
            known: dict[str, str] = {}
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            known = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in known and known[k] != v)
            if changed:
                log.info("MLflow keeps the first values of the parameters changed on resume: %s",
                         ", ".join(changed))
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), 100):  # a batch holds at most 100 parameters
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def _continued_run(self) -> Optional[str]:
        if not self.record.is_file():
            return None
        saved = json.loads(self.record.read_text())
        if saved.get("tracking_uri") != self.uri:
            log.warning("MLflow: this run folder's MLflow run is in %s, not %s: starting a new MLflow run",
                        saved.get("tracking_uri"), self.uri)
            return None
        run = self.client.get_run(saved["run_id"])
        for key in run.data.metrics:
            self.last_steps[key] = max(m.step for m in self.client.get_metric_history(saved["run_id"], key))
        return saved["run_id"]

    def _log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        values = {mlflow_name(k): v for k, v in values.items()}
        fresh = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.last_steps.get(k, -2**62)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for metric in fresh:
                self.last_steps[metric.key] = step

    def _close(self, status: str, artifacts: tuple[Path, ...]) -> None:
        try:
            for path in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
            run_dir = self.record.parent
            if status == "FINISHED" and (run_dir / "metrics.jsonl").is_file():
                from utils.plots import plot_runs, read_run  # the figures of `python -m utils.plots`

                with tempfile.TemporaryDirectory() as folder:
                    for figure in plot_runs([read_run(run_dir)], folder):
                        self.client.log_artifact(self.run_id, str(figure), artifact_path="figures")
        finally:  # an artifact that fails (the one warning) leaves no run RUNNING
            self.client.set_terminated(self.run_id, status=status)


# MLflow's HTTP defaults (7 retries with backoff factor 2, 120 s timeouts) can hold one logging call
# to a dead or hung tracking server for minutes before the sink's one warning, training stalled.
# Where the user has not set them: 2 retries, backoff factor 1, 10 s timeouts. A failing call then
# takes at most 3 tries of 10 s to connect and 10 s to read, plus 3 s of backoff (0 s, then 2 s and
# up to 1 s of jitter): about a minute at worst, 3 s when nothing listens any more.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_retries(environ=os.environ) -> None:
    """HTTP_BOUNDS for the variables the user has not set (MLflow reads them at each request)."""
    for name, value in HTTP_BOUNDS.items():
        environ.setdefault(name, value)


def open_sinks(run_dir: Path, config: dict, save_dir: str | Path, world_size: int, mlflow: bool, tensorboard: bool,
               resume_step: Optional[int] = None, records: tuple[dict, ...] = ()) -> list[Sink]:
    """The sinks asked for; one that cannot start logs one warning and is left out. `records`: the
    run folder's metrics.jsonl after a resume in place (TensorBoard writes again those it purges)."""
    sinks: list[Sink] = []
    if tensorboard:
        replay = tuple((epoch_values(r), r["step"]) for r in records
                       if resume_step is not None and "loss" not in r and r["step"] >= resume_step)
        _start(sinks, "TensorBoard", lambda: TensorBoardSink(run_dir, resume_step, replay))
    if mlflow:
        _start(sinks, "MLflow", lambda: MlflowSink(run_dir, save_dir, config, world_size))
    return sinks


def _start(sinks: list, name: str, make) -> None:
    try:
        sinks.append(make())
    except Exception as err:  # noqa: BLE001
        log.warning("%s: cannot start, the run goes on without it: %s", name, first_line(err))


def mlflow_name(tag: str) -> str:
    """A metric's name in MLflow: each character MLflow refuses as "_" (`epoch/knn@20_online` ->
    `epoch/knn_20_online`); TensorBoard and metrics.jsonl keep the name."""
    return MLFLOW_NAME_REFUSED.sub("_", tag)


def first_line(err: BaseException) -> str:
    """An error's first line, or its type's name when it has no message."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def epoch_values(record: dict) -> dict[str, float]:
    """An epoch record's scalars as `Tracker.log_metrics` logs them."""
    from trainer.tracking import loggable

    return {"epoch/" + k: float(v) for k, v in loggable(record).items()}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{'a': {'b': 1}}` -> `{'a.b': '1'}`; lists as JSON; values cut to PARAM_LIMIT characters."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:PARAM_LIMIT]
    return flat


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
