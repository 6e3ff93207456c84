"""One mixed-precision path: an autocast context and a loss scaler that is a no-op unless the run
is float16, so backward, unscale, clip and step are written once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Union

import torch

log = logging.getLogger("groco")


@dataclasses.dataclass
class Precision:
    """`dtype` None = float32."""

    device: torch.device
    dtype: Union[torch.dtype, None]
    scaler: torch.amp.GradScaler

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[self.dtype]


def make_precision(mixed_precision: Union[bool, str], device: torch.device) -> Precision:
    """`mixed_precision`: false -> float32; true / 'fp16' -> float16 with a scaler (the paper's);
    'bf16' -> bfloat16. On the CPU every run is float32 (and the log says so when more was asked)."""
    wanted = {False: None, True: torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    if device.type != "cuda":
        if wanted is not None:
            log.info("trainer.mixed_precision=%s: mixed precision is for CUDA; running float32 on %s",
                     mixed_precision, device.type)
        wanted = None
    scaler = torch.amp.GradScaler(device.type, enabled=wanted is torch.float16)
    return Precision(device, wanted, scaler)
