"""DenseNet-121 for 32x32 inputs (Huang et al., 2017), growth rate 32, with Random Mask slots.

Blocks as the paper counts them: stem conv, dense1-4 (each with the transition after it);
shallow = stem, dense1, dense2 and their transitions; deep = dense3, dense4 and the transition
between them. As the authors' ``densenet_drop_012_05.py``: in a masked part, the BatchNorm
before each dense layer's 1x1 conv and each transition's BatchNorm are masked before their ReLU,
the BatchNorm before the 3x3 conv is not: 20 masks shallow. The authors masked no deep
DenseNet; the deep part follows the same rule (41 masks). The stem conv has no BatchNorm of its
own: the first dense layer's masked BatchNorm is what masks it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model

PARTS_OF_BLOCKS = ("shallow", "shallow", "deep", "deep")


class DenseLayer(nn.Module):
    """BN-mask-ReLU-conv1x1 (4g) then BN-ReLU-conv3x3 (g); output concatenated to input.

    Input (N, in_planes, H, W); output (N, in_planes + growth, H, W).
    """

    def __init__(self, in_planes: int, growth: int, plan: LayerPlan, part: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.mask1 = plan.masker(part)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.mask1(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-mask-ReLU-conv1x1 then 2x2 average pooling: (N, in_planes, H, W) -> (N, out_planes, H/2, W/2)."""

    def __init__(self, in_planes: int, out_planes: int, plan: LayerPlan, part: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.mask = plan.masker(part)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.mask(self.bn(x)))), 2)


class DenseNet(nn.Module):
    """Input: normalised images (N, C, H, W); output logits (N, num_classes).

    The plan sizes the stem (2 x growth) and each dense block's growth rate; transitions keep
    their compression of whatever width reaches them.
    """

    def __init__(self, num_layers: list[int], growth: int, plan: LayerPlan, in_channels: int,
                 num_classes: int, reduction: float = 0.5) -> None:
        super().__init__()
        planes = plan.channels(2 * growth, "shallow")
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, (n, part) in enumerate(zip(num_layers, PARTS_OF_BLOCKS)):
            g = plan.channels(growth, part)
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, g, plan, part))
                planes += g
            stages.append(nn.Sequential(*layers))
            if i < len(num_layers) - 1:
                out_planes = math.floor(planes * reduction)
                stages.append(Transition(planes, out_planes, plan, part))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("densenet121", revision=2)
def densenet121(plan: LayerPlan, in_channels: int, num_classes: int) -> DenseNet:
    return DenseNet([6, 12, 24, 16], 32, plan, in_channels, num_classes)
