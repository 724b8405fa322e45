"""SENet-18, pre-activation version (Hu et al., 2017), for 32x32 inputs, with Random Mask slots.

ResNet-18's layout with pre-activation squeeze-and-excitation blocks. Each BatchNorm output is
masked before its ReLU; shallow = stem, layer1, layer2 (the first SE blocks); deep = layer3-4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model
from rm_sweep.models.resnet import PARTS_OF_LAYERS


class PreActSEBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.mask1 = plan.masker(part)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        # Squeeze-and-excitation with reduction 16, as 1x1 convs on the pooled map.
        self.fc1 = nn.Conv2d(planes, max(1, planes // 16), 1)
        self.fc2 = nn.Conv2d(max(1, planes // 16), planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.mask2(self.bn2(out))))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return out * w + shortcut


class SENet(nn.Module):
    """Input: normalised images (N, C, H, W); output logits (N, num_classes)."""

    def __init__(self, num_blocks: list[int], plan: LayerPlan, in_channels: int, num_classes: int) -> None:
        super().__init__()
        stem = plan.channels(64, "shallow")
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.mask1 = plan.masker("shallow")
        in_planes, layers = stem, []
        for i, (base, n, part) in enumerate(zip((64, 128, 256, 512), num_blocks, PARTS_OF_LAYERS)):
            planes = plan.channels(base, part)
            blocks = []
            for j in range(n):
                blocks.append(PreActSEBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, plan, part))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("senet18")
def senet18(plan: LayerPlan, in_channels: int, num_classes: int) -> SENet:
    return SENet([2, 2, 2, 2], plan, in_channels, num_classes)
