"""Logging with the rank in every record: rank 0 logs at INFO, the others warnings and errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "groco"
FORMAT = "%(asctime)s [rank %(rank)d] %(levelname)s %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


_rank = 0


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int = 0) -> logging.Logger:
    """Configure the project logger for this process (idempotent) and return it."""
    global _rank
    _rank = rank
    logger = get_logger()
    logger.handlers.clear()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))  # on the handler: records of child loggers get the rank too
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def log_to_file(path: Path) -> None:
    """Also write the log to `path` (the run folder's `train.log`)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(_rank))
    get_logger().addHandler(handler)
