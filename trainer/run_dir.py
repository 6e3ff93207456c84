"""The run folder `save_dir/models/<name>/<MMDD_HHMMSS>/`: `config.yaml`, `latest_model.pth`,
`checkpoint-epoch{E}.pth`, `metrics.jsonl` (a JSON object per step and per epoch), `results.json`,
`train.log`; only the main process writes it. A resume needs only the checkpoint, so a torn line
of `metrics.jsonl` is skipped with a warning."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from utils.files import write_error, write_text_atomic

log = logging.getLogger("groco")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


class RunDir:
    """Paths of one run; `create` makes a new, empty folder (never reuses an existing one)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, save_dir: str, name: str) -> RunDir:
        base = Path(save_dir) / "models" / name
        stamp = datetime.now().strftime("%m%d_%H%M%S")
        for suffix in [""] + [f"_{i}" for i in range(1, 100)]:
            path = base / f"{stamp}{suffix}"
            try:
                path.mkdir(parents=True, exist_ok=False)
                return cls(path)
            except FileExistsError:
                continue
        raise FileExistsError(f"could not create a new run folder under {base}")

    def write_config(self, config: dict) -> None:
        write_text_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def checkpoint(self, epoch: int | None = None) -> Path:
        return self.path / ("latest_model.pth" if epoch is None else f"checkpoint-epoch{epoch}.pth")

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    def truncate_metrics(self, steps_done: int, epoch_recorded: bool = True) -> None:
        """Cut `metrics.jsonl` back to a checkpoint at `steps_done` steps: drop later steps'
        records, unreadable lines and, unless `epoch_recorded`, the checkpoint's own epoch record
        (saved before its evaluation, which the resumed run records again)."""
        if not self.metrics.is_file():
            return
        kept = [json.dumps(r) for r in self.read_metrics()
                if _record_before(r, steps_done) and (epoch_recorded or "loss" in r or r["step"] < steps_done)]
        write_text_atomic(self.metrics, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict]:
        """The records of `metrics.jsonl` in order; a line that is no JSON object with a `step` is
        skipped with a warning."""
        if not self.metrics.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                log.warning("%s, line %d: not a metrics record, skipped: %.80s", self.metrics, number, line)
        return records

    def append_metrics(self, records: list[dict]) -> None:
        """Append `records`, one line each; WriteError when the file cannot take them (a torn last
        line is then skipped by `read_metrics`)."""
        try:
            with open(self.metrics, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
        except OSError as err:
            raise write_error(self.metrics, err) from None

    def last_checkpoint(self) -> str:
        """The newest checkpoint file here (each is complete), or a phrase saying there is none."""
        saved = sorted(self.path.glob("*.pth"), key=lambda p: p.stat().st_mtime)
        return str(saved[-1]) if saved else f"none yet in {self.path}"

    def remove_temporary_files(self) -> None:
        """Delete what a killed write left behind (`.NAME.tmp`, see `utils.files.write_bytes_atomic`)."""
        for tmp in self.path.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted write", tmp)
            tmp.unlink(missing_ok=True)


def _record_before(record: dict, steps_done: int) -> bool:
    """A step record (has `loss`) of step index < steps_done, or an epoch record reached by then."""
    return record["step"] < steps_done if "loss" in record else record["step"] <= steps_done
