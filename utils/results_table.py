"""One table of evaluation runs, from their run folders (`results.json`, `config.yaml`).

    python -m utils.results_table RUN_FOLDER [RUN_FOLDER ...] [--format markdown|csv]

One row per run: its folder (`<name>/<MMDD_HHMMSS>`), the encoder (the config's `encoder` block),
the weights file and its format (`results.json`'s `weights`, written by eval.py; for a checkpoint
made by pretrained/import_weights.py the original file, its format marked "imported"), and every
metric of `results.json`'s `final` under its own name (`knn@20_final`,
`linear_prob_regular_val_top_1`, ...), as the fraction stored there (4 decimals in markdown, in
full in CSV). A folder without `results.json` stands for the run folders below it. Exit status 2
with one line for a folder without runs or an unreadable file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Optional

import yaml

FIXED = ["run", "encoder", "weights", "format"]


class TableError(RuntimeError):
    """A folder or file that gives no row; the message names it."""


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders: each path holding `results.json`, else every folder below it that does."""
    found = []
    for path in paths:
        if (path / "results.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("results.json")) if path.is_dir() else []
        if not below:
            raise TableError(f"{path}: no results.json in it or below it")
        found.extend(below)
    return found


def encoder_text(block: Optional[dict]) -> str:
    """`resnet50`, `resnet18 (width 16, CIFAR stem)`, or the block's type."""
    if not isinstance(block, dict):
        return ""
    args = block.get("args") or {}
    text = str(args.get("arch", block.get("type", "")))
    extras = ([f"width {args['width']}"] if args.get("width", 64) != 64 else []) + \
             (["CIFAR stem"] if args.get("cifar_stem") else [])
    return f"{text} ({', '.join(extras)})" if extras else text


def read_row(run: Path) -> dict:
    """The table's row of one run folder."""
    try:
        results = json.loads((run / "results.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise TableError(f"{run}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") \
            from None
    if not isinstance(results, dict):
        raise TableError(f"{run}/results.json: not a JSON object")
    weights = results.get("weights") or {}
    source = weights.get("imported_from") if isinstance(weights.get("imported_from"), dict) else None
    row = {
        "run": f"{run.parent.name}/{run.name}",
        "encoder": encoder_text((config or {}).get("encoder")),
        "weights": (source or weights).get("path", ""),
        "format": f"{source['format']} (imported)" if source else weights.get("format", ""),
    }
    row.update({k: v for k, v in (results.get("final") or {}).items() if isinstance(v, (int, float))})
    return row


def metric_order(name: str) -> tuple:
    """k-NN first, then the linear probes, then the rest; numbers in names compared as numbers."""
    family = 0 if name.startswith("knn") else 1 if name.startswith("linear_prob") else 2
    return (family, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def table(rows: list[dict], fmt: str = "markdown") -> str:
    metrics = sorted({k for row in rows for k in row if k not in FIXED}, key=metric_order)
    columns = FIXED + metrics
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_FOLDER")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    args = parser.parse_args(argv)
    try:
        rows = [read_row(run) for run in run_folders(args.runs)]
    except TableError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(table(rows, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
