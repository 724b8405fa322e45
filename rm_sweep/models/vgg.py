"""VGG-19 with BatchNorm (Simonyan & Zisserman, 2014) for 32x32 (CIFAR-10) or 28x28 (MNIST)
inputs, one final linear layer.

Shallow = the first four conv layers (the paper's masked part), deep = the other twelve.
As the authors' ``vgg_drop_01_05.py``: each conv's BatchNorm output in a masked part is masked
before its ReLU (4 masks shallow); the authors masked no deep VGG, the deep part follows the
same rule (12 masks). Convs carry a bias, as kuangliu's ``vgg.py`` the authors built on.
Pools floor, as theirs; a map already 1x1 is not pooled again (``Pool``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model

# Channels per conv layer; "M" is a 2x2 max pool.
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
SHALLOW_CONVS = 4


class Pool(nn.Module):
    """2x2 max pooling (floor) of (N, C, H, W), left out where the map is already 1x1.

    At 32x32 (CIFAR-10) all five pools run (1x1 after the fifth). The authors' MNIST VGG-19
    (``MNIST/Models/vgg_unfold.py``, ``vgg_drop_01_05.py``) leaves out its fifth pool: 28x28 maps
    are 1x1 after four (14, 7, 3, 1), and its last four convs run at 1x1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2:] == (1, 1) else F.max_pool2d(x, 2)


def vgg(cfg: list[int | str], plan: LayerPlan, in_channels: int, num_classes: int) -> nn.Sequential:
    """Input: normalised images (N, C, H, W); output logits (N, num_classes)."""
    layers: list[nn.Module] = []
    planes, n_conv = in_channels, 0
    for item in cfg:
        if item == "M":
            layers.append(Pool())
            continue
        part = "shallow" if n_conv < SHALLOW_CONVS else "deep"
        out = plan.channels(int(item), part)
        layers += [nn.Conv2d(planes, out, 3, padding=1), nn.BatchNorm2d(out), plan.masker(part), nn.ReLU()]
        planes, n_conv = out, n_conv + 1
    layers += [nn.Flatten(), nn.Linear(planes, num_classes)]
    return nn.Sequential(*layers)


@register_model("vgg19", revision=3)
def vgg19(plan: LayerPlan, in_channels: int, num_classes: int) -> nn.Sequential:
    return vgg(VGG19, plan, in_channels, num_classes)
