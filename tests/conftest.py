"""Shared test helpers: run the entry points in-process on the bundled digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval as eval_entry
import train as train_entry

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.yaml"


def run_train(*argv: str) -> int:
    return train_entry.main([str(a) for a in argv])


def run_eval(*argv: str) -> int:
    return eval_entry.main([str(a) for a in argv])


def only_run_dir(save_dir: Path, name: str) -> Path:
    """The single run folder under save_dir/models/name."""
    runs = sorted((save_dir / "models" / name).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def small_quickstart(tmp_path):
    """Quickstart arguments for a short CPU run writing under tmp_path."""
    return ["--config", QUICKSTART, f"save_dir={tmp_path}", "--device", "cpu"]
