"""A fixed random convolutional feature extractor: a sanity baseline that needs no training or weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RandomConvFeatures(nn.Module):
    r"""
    A fixed random feature extractor: three 3×3 conv layers (stride 1, 2, 2) with ReLU, then global average
    pooling. `forward` and `features` map images `(N, in_channels, H, W)` to features `(N, dim)`.

    The weights are a pure function of `seed`: float64 uniforms from a CPU `torch.Generator` (integer
    Mersenne-Twister output scaled by powers of two, so bit-identical on every machine) with He-uniform scale
    √(6/fan_in), rounded to float32; biases are zero; parameters are frozen. `num_features` is set, so the
    module plugs into :func:`extract_features` and torchmetrics.

    Args:
        in_channels (`int`, *optional*, defaults to 1):
            Image channels.
        dim (`int`, *optional*, defaults to 64):
            Feature width.
        seed (`int`, *optional*, defaults to 0):
            Fixes the weights.
        width (`int`, *optional*, defaults to 32):
            Channels of the first layer (the second has twice as many).
    """

    def __init__(self, in_channels: int = 1, dim: int = 64, seed: int = 0, width: int = 32):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("dim", dim), ("width", width)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.in_channels = in_channels
        self.num_features = dim
        self.seed = int(seed)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, dim, 3, stride=2, padding=1)

        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3):
                fan_in = conv.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in)
                uniform = torch.rand(conv.weight.shape, generator=gen, dtype=torch.float64)
                conv.weight.copy_((2.0 * uniform - 1.0) * bound)
                conv.bias.zero_()
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected images of shape (N, {self.in_channels}, H, W), got {list(x.shape)}"
            )
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
