"""The multiscale cell ``f(z, x, k)``: one block per resolution, then a fusion step that mixes them.

Bai et al. (NeurIPS 2020) iterate a tuple of feature maps ``z = (z_0, ..., z_{n-1})``, ``z_i: (B, C_i, S_i, S_i)``
with ``S_{i+1} = ceil(S_i / 2)``. Each branch applies a block (conv, GroupNorm, ReLU, iteration-consistent
dropout, conv; the image's injection is added in the highest-resolution branch only). The fusion step then gives
every branch the sum of all branches brought to its resolution (strided 3x3 convs to go down, a 1x1 conv and
nearest upsampling to go up), followed by ReLU and GroupNorm. GroupNorm works per sample, so the cell is
row-wise: a separable solve may pass it any subset of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen.models.mdeq.config import MDEQConfig
from deqgen.nn.dropout import VariationalDropout
from deqgen.nn.normalization import apply_norm

__all__ = ["BranchBlock", "Fusion", "MDEQCell"]

MultiScale = tuple[Tensor, ...]
"""``(z_0, ..., z_{n-1})``, ``z_i: (B, C_i, S_i, S_i)``, highest resolution first."""


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BranchBlock(nn.Module):
    """``conv2(drop(relu(gn1(conv1(z))))) + inj`` at one resolution (normalised after fusion).

    The block ends without a norm: a GroupNorm here would rescale a small update back to unit size whatever
    the weights, and the map could not contract. Normalising after the fusion, where the injection dominates
    the sum, keeps ``f`` a contraction at initialisation (``init_scale`` shrinks ``conv2``).

    Args:
        channels: ``C`` of this branch.
        num_groups: GroupNorm groups.
        dropout: iteration-consistent channel dropout after the first convolution.
        init_scale: factor on ``conv2``'s initial weight.
    """

    def __init__(self, channels: int, num_groups: int, dropout: float = 0.0, init_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels)
        self.gn1 = nn.GroupNorm(num_groups, channels)
        self.drop = VariationalDropout(dropout, shared_dims=(2, 3))
        self.conv2 = _conv3x3(channels, channels)
        with torch.no_grad():
            self.conv2.weight.mul_(init_scale)

    def forward(self, z_BCHW: Tensor, inj_BCHW: Tensor | None = None) -> Tensor:
        """``z: (B, C, S, S)``, optional injection of the same shape -> ``(B, C, S, S)``."""
        y = self.conv2(self.drop(F.relu(self.gn1(self.conv1(z_BCHW)))))
        return y if inj_BCHW is None else y + inj_BCHW


class _Down(nn.Sequential):
    """``steps`` strided 3x3 convolutions from ``c_in`` to ``c_out`` channels (ReLU between them, no norm:
    the sum is normalised after fusion)."""

    def __init__(self, c_in: int, c_out: int, steps: int) -> None:
        layers: list[nn.Module] = []
        for s in range(steps):
            last = s == steps - 1
            layers.append(_conv3x3(c_in, c_out if last else c_in, stride=2))
            if not last:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class _Up(nn.Module):
    """A 1x1 convolution to ``c_out`` channels, then nearest upsampling to the target's side."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, y_BCHW: Tensor, side: int) -> Tensor:
        return F.interpolate(self.conv(y_BCHW), size=(side, side), mode="nearest")


class Fusion(nn.Module):
    """Branch ``i`` receives ``gn_i(relu(sum_j resample_{j->i}(y_j)))``.

    Args:
        channels: channels per branch, highest resolution first.
        num_groups: GroupNorm groups.
    """

    def __init__(self, channels: tuple[int, ...], num_groups: int) -> None:
        super().__init__()
        n = len(channels)
        self.paths = nn.ModuleDict()
        for i in range(n):
            for j in range(n):
                if j < i:
                    self.paths[f"{j}to{i}"] = _Down(channels[j], channels[i], i - j)
                elif j > i:
                    self.paths[f"{j}to{i}"] = _Up(channels[j], channels[i])
        self.post = nn.ModuleList(nn.GroupNorm(num_groups, c) for c in channels)

    def forward(self, ys: MultiScale) -> MultiScale:
        """``ys``: one ``(B, C_i, S_i, S_i)`` per branch -> the fused maps, same shapes."""
        out = []
        for i, y_i in enumerate(ys):
            total = y_i
            for j, y_j in enumerate(ys):
                if j < i:
                    total = total + self.paths[f"{j}to{i}"](y_j)
                elif j > i:
                    total = total + self.paths[f"{j}to{i}"](y_j, y_i.shape[-1])
            out.append(self.post[i](F.relu(total)))
        return tuple(out)


class MDEQCell(nn.Module):
    """The DEQ map ``f(z, x, k)``: branch blocks, then fusion. ``x: (B, C_0, S_0, S_0)`` is the injection
    into the highest-resolution branch; ``k`` (the iteration number) is unused.

    Args:
        config: the model shape (channels, groups, dropout, weight normalisation).
    """

    def __init__(self, config: MDEQConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BranchBlock(c, config.num_groups, config.dropout, config.init_scale) for c in config.channels
        )
        self.fusion = Fusion(config.channels, config.num_groups)
        if config.weight_norm:
            apply_norm(self, "weight", types=(nn.Conv2d,))

    def forward(self, z: MultiScale, x_BCHW: Tensor, k: int = 0) -> MultiScale:
        """``z``: the multiscale state; returns the next one (same shapes)."""
        ys = tuple(
            block(z_i, x_BCHW if i == 0 else None) for i, (block, z_i) in enumerate(zip(self.blocks, z))
        )
        return self.fusion(ys)
