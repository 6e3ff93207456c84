"""The encoder (docs/reference.md §3): a torchvision ResNet without its classifier, held in the
attribute `encoder` so that keys read `encoder.conv1.weight` as in the released checkpoints."""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils.config import ConfigError
from utils.registry import ENCODERS

RESNET_LAYOUTS = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),  # not in torchvision: one block a stage, for quick runs
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def build_resnet(arch: str, width: int = 64, cifar_stem: bool = False) -> tvm.ResNet:
    """A torchvision ResNet (`zero_init_residual=True`); ConfigError for an unknown `arch`.

    `arch`: a torchvision ResNet name or `resnet10` (one block a stage); `width`: channels of the
    stem and first stage (64 = torchvision, other widths only for RESNET_LAYOUTS); `cifar_stem`: a
    3x3 stride-1 first convolution and no max-pool, for images of 32 px or less.
    """
    in_torchvision = arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(tvm, arch)
    if not in_torchvision and arch not in RESNET_LAYOUTS:
        raise ConfigError(f"encoder.args.arch: unknown ResNet {arch!r}")
    if width == 64 and in_torchvision:
        net = getattr(tvm, arch)(zero_init_residual=True)
    else:
        if arch not in RESNET_LAYOUTS:
            raise ConfigError(
                f"encoder.args.width: a width other than 64 needs one of {sorted(RESNET_LAYOUTS)}, got {arch!r}"
            )
        net = _narrow_resnet(*RESNET_LAYOUTS[arch], width)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net


def _narrow_resnet(block: type, layers: list[int], width: int) -> tvm.ResNet:
    """torchvision's ResNet with every stage's width scaled by width / 64 (same key names)."""
    net = tvm.ResNet(block, layers)
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    net.fc = nn.Linear(width * 8 * block.expansion, 1000)
    # torchvision's initialisation, zero_init_residual=True included
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net


@ENCODERS.register("RegularEncoder", "ResNetEncoder")
class ResNetEncoder(nn.Module):
    """ResNet trunk (arguments as `build_resnet`); `forward([B, 3, H, W]) -> [B, feature_dim]`."""

    def __init__(self, arch: str, width: int = 64, cifar_stem: bool = False):
        super().__init__()
        self.encoder = build_resnet(arch, width=width, cifar_stem=cifar_stem)
        self.feature_dim = self.encoder.fc.in_features
        self.encoder.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)
