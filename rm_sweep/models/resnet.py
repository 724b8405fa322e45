"""ResNet-18/50 for 32x32 inputs (He et al., 2016), CIFAR style, with Random Mask slots.

Blocks as the paper counts them: 1 = stem conv, 2-5 = layer1-4; shallow = blocks 1-3, deep =
layer3-4. A mask follows a BatchNorm, before its ReLU (a residual branch's last one before the
add), where the authors' model files (tiangeluo/DefectiveCNN ``Models/``) put one:

- ResNet-18 (``resnet_drop_012_05.py``, ``resnet_drop_34_05.py``): the stem (shallow only), both
  BatchNorms of every block of a masked part and its projection shortcut: 10 masks per part.
- ResNet-50 (``resnet50_drop_012_05.py``): the stem (shallow only) and the BatchNorm after each
  bottleneck's 3x3 conv; none after a 1x1 conv or on a shortcut: 8 masks shallow. The authors
  masked no deep ResNet-50; the deep part follows the same rule (9 masks).

A resized shallow part (channel multiplier or DC) gives layer1's first block an unmasked 1x1
projection shortcut although its widths match, as the authors' resized ResNet-18s
(``resnet_drop_012_05_c20.py``, ``resnet_drop_012_dc05.py``) have. The skeleton applies this to
every block it builds, SENet-18's included (the authors resized no SENet; one rule is simplest).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model

PARTS_OF_LAYERS = ("shallow", "shallow", "deep", "deep")


def _shortcut(in_planes: int, out_planes: int, stride: int, project: bool, mask: nn.Module) -> nn.Module:
    """Identity where shapes match, else a 1x1 conv + BatchNorm projection followed by ``mask``.

    ``project`` asks for a projection where shapes match too; that one is never masked.
    """
    conv_bn = (nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))
    if stride != 1 or in_planes != out_planes:
        return nn.Sequential(*conv_bn, mask)
    return nn.Sequential(*conv_bn) if project else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs, both BatchNorm outputs masked, and the projection shortcut's too.

    Input (N, in_planes, H, W); output (N, planes, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.mask1 = plan.masker(part)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.shortcut = _shortcut(in_planes, planes, stride, project, plan.masker(part))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = self.mask2(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convs; only the 3x3 conv's BatchNorm output is masked.

    Input (N, in_planes, H, W); output (N, 4 * planes, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str, project: bool) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride, project, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.mask2(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Input: normalised images (N, C, H, W); output logits (N, num_classes).

    ``mask_stem``: whether the stem's BatchNorm output is masked where the shallow part is.
    """

    def __init__(self, block: type[nn.Module], num_blocks: list[int], plan: LayerPlan,
                 in_channels: int, num_classes: int, mask_stem: bool = True) -> None:
        super().__init__()
        stem = plan.channels(64, "shallow")
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.mask1 = plan.masker("shallow") if mask_stem else nn.Identity()
        in_planes, layers = stem, []
        for i, (base, n, part) in enumerate(zip((64, 128, 256, 512), num_blocks, PARTS_OF_LAYERS)):
            planes = plan.channels(base, part)
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                project = i == 0 and j == 0 and plan.resized(part)
                blocks.append(block(in_planes, planes, stride, plan, part, project))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("resnet18", revision=2)
def resnet18(plan: LayerPlan, in_channels: int, num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], plan, in_channels, num_classes)


@register_model("resnet50", revision=2)
def resnet50(plan: LayerPlan, in_channels: int, num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], plan, in_channels, num_classes)
