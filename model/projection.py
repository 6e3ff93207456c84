"""Projection head and linear classifier (docs/reference.md §3). The head is the attribute
`projection`, so keys read `projection.0.weight` as in the released checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from utils.config import ConfigError
from utils.registry import PROJECTIONS


def projection_head(input_dim: int, num_layers: int, output_dim: int, batch_norm_first: bool) -> nn.Sequential:
    """(L-1) x [Linear(d, d, no bias), BN, ReLU] + Linear(d, out) with a frozen bias + BN(out, affine=False)."""
    layers: list[nn.Module] = [nn.BatchNorm1d(input_dim)] if batch_norm_first else []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(input_dim, input_dim, bias=False), nn.BatchNorm1d(input_dim), nn.ReLU(inplace=True)]
    last = nn.Linear(input_dim, output_dim, bias=True)
    last.bias.requires_grad = False  # as in the paper's code, for comparability
    layers += [last, nn.BatchNorm1d(output_dim, affine=False)]
    return nn.Sequential(*layers)


@PROJECTIONS.register("RegularProjection", "MLPProjection")
class MLPProjection(nn.Module):
    """`projection_head` as a config block; `forward([B, input_dim]) -> [B, output_dim]`.
    `input_dim` is the encoder's feature dimension (given by the program); ConfigError when
    `num_layers` < 1."""

    def __init__(self, input_dim: int, num_layers: int = 3, output_dim: int = 2048, batch_norm_first: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"projection.args.num_layers must be at least 1, got {num_layers}")
        self.projection = projection_head(input_dim, num_layers, output_dim, batch_norm_first)
        self.output_dim = output_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)


class LinearClassifier(nn.Module):
    """Linear probe: `forward([B, input_dim]) -> [B, num_classes]` logits; weights N(0, 0.01), bias 0."""

    def __init__(self, input_dim: int, num_classes: int = 1000):
        super().__init__()
        self.fc = nn.Linear(input_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class SSLModel(nn.Module):
    """Encoder + projection head; each view is its own encoder batch (own BatchNorm statistics)."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """`views`: V tensors `[B, 3, H_v, W_v]` -> V embeddings `[B, output_dim]`."""
        return [self.projection(self.encoder(v)) for v in views]
