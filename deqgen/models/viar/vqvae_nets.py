"""Parts of VAR's multi-scale VQVAE: the conv trunk (latent-diffusion's vq-f16) and the Phi convs.

Module and parameter names follow the official checkpoint (``down.{i}.block.{j}.norm1``,
``mid.attn_1.qkv``, ``up.{level}.upsample.conv`` ...), so its state dict loads key for key.

Every normalisation is ``GroupNorm(norm_groups, C, eps=1e-6)`` with affine parameters and every activation
is SiLU. The encoder halves the resolution after each level but the last; the decoder mirrors it with
one extra residual block per level and nearest-neighbour upsampling.

:class:`Phi` is the quantizer's refinement conv and :class:`PhiBank` holds the ``Phi`` convs of all scales;
:mod:`deqgen.models.viar.vqvae` re-exports both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Phi",
    "PhiBank",
    "ResnetBlock",
    "Upsample",
    "check_positive",
    "phi_indices",
]

logger = logging.getLogger(__name__)

#: GroupNorm epsilon of the official trunk.
NORM_EPS = 1e-6


def check_positive(name: str, value: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a positive int."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(drop(silu(gn(conv(silu(gn(x)))))))``.

    A 1x1 ``nin_shortcut`` projects the skip path when the channel count changes.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dropout: dropout rate before the second conv (no module when 0).
        norm_groups: GroupNorm groups; must divide both channel counts.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, with a residual connection.

    ``qkv`` is one 1x1 conv to ``3C`` channels; logits are scaled by ``C ** -0.5``.

    Args:
        channels: ``C``.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, channels: int, *, norm_groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.scale = channels**-0.5

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        q_BCN, k_BCN, v_BCN = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # Written as two batched matmuls (not SDPA) to keep the reference's summation order.
        logits_BNN = torch.bmm(q_BCN.transpose(1, 2), k_BCN) * self.scale  # [b, query, key]
        weights_BNN = logits_BNN.softmax(dim=-1)
        out_BCN = torch.bmm(v_BCN, weights_BNN.transpose(1, 2))
        return x + self.proj_out(out_BCN.reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 conv.

    Args:
        channels: channels in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C, H, W) -> (B, C, H // 2, W // 2) for even ``H, W``."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv.

    Args:
        channels: channels in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, each followed by its attention block when there are any,
    then an optional resampling module (``downsample`` in the encoder, ``upsample`` in the decoder)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        attns: Sequence[nn.Module],
        *,
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if attns and len(attns) != len(blocks):
            raise ValueError(
                f"a level needs one attention block per residual block, got {len(attns)} vs {len(blocks)}"
            )
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        # None attributes are skipped by state_dict, so levels without resampling have no such keys.
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    """Residual block, attention (or identity), residual block at the lowest resolution."""

    def __init__(self, channels: int, *, attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn_1: nn.Module = AttnBlock(channels, norm_groups=norm_groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image to latent: ``conv_in``, one level per ``ch_mult`` entry, mid block, GN, SiLU, ``conv_out``.

    Level ``i`` has ``num_res_blocks`` residual blocks of ``ch * ch_mult[i]`` channels and, except for the
    last level, a :class:`Downsample`; the last level also has one :class:`AttnBlock` per residual block when
    ``level_attention`` is set. Total downsampling is ``2 ** (len(ch_mult) - 1)``.

    Args:
        ch: base width.
        ch_mult: width multiplier per level.
        num_res_blocks: residual blocks per level.
        in_channels: image channels.
        z_channels: output (latent) channels.
        dropout: dropout rate inside residual blocks.
        norm_groups: GroupNorm groups.
        level_attention: attention blocks at the last (lowest-resolution) level.
        mid_attention: attention block in the mid block.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
        dropout: float,
        norm_groups: int,
        level_attention: bool,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        levels, c_in = [], ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, dropout=dropout, norm_groups=norm_groups))
                c_in = c_out
            attns = (
                [AttnBlock(c_out, norm_groups=norm_groups) for _ in blocks]
                if i == last and level_attention
                else []
            )
            levels.append(_Level(blocks, attns, downsample=Downsample(c_out) if i != last else None))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, attention=mid_attention, dropout=dropout, norm_groups=norm_groups)
        self.norm_out = _group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, in_channels, H, W) -> (B, z_channels, H / d, W / d) with ``d = 2 ** (len(ch_mult) - 1)``."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image: ``conv_in``, mid block, levels from the last to the first, GN, SiLU, ``conv_out``.

    ``up[i]`` is keyed by level (``up[len(ch_mult) - 1]`` is the widest, lowest-resolution one) and runs
    ``num_res_blocks + 1`` residual blocks of ``ch * ch_mult[i]`` channels, attention after each of them at
    the last level when ``level_attention`` is set, and an :class:`Upsample` for every level but level 0.

    Args:
        ch: base width.
        ch_mult: width multiplier per level.
        num_res_blocks: the encoder's residual blocks per level (the decoder uses one more).
        out_channels: image channels.
        z_channels: input (latent) channels.
        dropout: dropout rate inside residual blocks.
        norm_groups: GroupNorm groups.
        level_attention: attention blocks at the last (lowest-resolution) level.
        mid_attention: attention block in the mid block.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        out_channels: int,
        z_channels: int,
        dropout: float,
        norm_groups: int,
        level_attention: bool,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        c_in = ch * ch_mult[last]
        self.conv_in = nn.Conv2d(z_channels, c_in, kernel_size=3, padding=1)
        self.mid = _Mid(c_in, attention=mid_attention, dropout=dropout, norm_groups=norm_groups)
        levels: list[nn.Module] = [nn.Identity()] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, dropout=dropout, norm_groups=norm_groups))
                c_in = c_out
            attns = (
                [AttnBlock(c_out, norm_groups=norm_groups) for _ in blocks]
                if i == last and level_attention
                else []
            )
            levels[i] = _Level(blocks, attns, upsample=Upsample(c_out) if i != 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """``z``: (B, z_channels, h, w) -> (B, out_channels, h * d, w * d), unclamped."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def phi_indices(num_scales: int, share_quant_resi: int) -> list[int]:
    """Which ``Phi`` conv each scale uses.

    With ``n`` convs (``n = num_scales`` when ``share_quant_resi`` is 0, else ``share_quant_resi``) the
    convs sit at ticks ``linspace(1/(3n), 1 - 1/(3n), n)`` when ``n == 4`` and ``linspace(1/(2n),
    1 - 1/(2n), n)`` otherwise; scale ``si`` takes the conv whose tick is nearest
    ``si / (num_scales - 1)``. This runs in float64 exactly as the reference does, which matters for the
    exact ties (scales 2 and 7 of 10 go to convs 1 and 3). With a single scale the position is taken as 0.

    Args:
        num_scales: the number of scales.
        share_quant_resi: as :attr:`~deqgen.models.viar.vqvae.VQVAEConfig.share_quant_resi`.

    Returns:
        ``num_scales`` conv indices, e.g. ``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]`` for 10 scales and 4 convs.
    """
    check_positive("num_scales", num_scales)
    n = num_scales if share_quant_resi == 0 else share_quant_resi
    if n == 1:
        return [0] * num_scales
    margin = 1 / 3 / n if n == 4 else 1 / 2 / n
    ticks = np.linspace(margin, 1 - margin, n)
    positions = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - at))) for at in positions]


class Phi(nn.Conv2d):
    """``Phi(h) = (1 - r) h + r conv3x3(h)``, the refinement applied to each scale's upsampled codes.

    Args:
        channels: ``Cvae``.
        ratio: ``r`` in ``[0, 1]``.
    """

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: Tensor) -> Tensor:
        """``h``: (B, C, H, W) -> (B, C, H, W)."""
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiBank(nn.Module):
    """The ``Phi`` convs and the scale-to-conv map of :func:`phi_indices`.

    Submodule names follow the official layouts: ``{i}`` for one conv per scale (``share_quant_resi`` 0),
    ``qresi`` for one shared conv (1), ``qresi_ls.{i}`` otherwise.

    Args:
        channels: ``Cvae``.
        ratio: ``quant_resi``; 0 makes every ``Phi`` an identity.
        num_scales: the number of scales.
        share_quant_resi: as :attr:`~deqgen.models.viar.vqvae.VQVAEConfig.share_quant_resi`.
    """

    def __init__(self, channels: int, ratio: float, num_scales: int, share_quant_resi: int) -> None:
        super().__init__()
        count = num_scales if share_quant_resi == 0 else share_quant_resi
        phis = [Phi(channels, ratio) if ratio > 0 else nn.Identity() for _ in range(count)]
        self.share_quant_resi = share_quant_resi
        if share_quant_resi == 0:
            for i, phi in enumerate(phis):
                self.add_module(str(i), phi)
        elif share_quant_resi == 1:
            self.qresi = phis[0]
        else:
            self.qresi_ls = nn.ModuleList(phis)
        self.scale_to_phi: list[int] = phi_indices(num_scales, share_quant_resi)

    def forward(self, si: int, h: Tensor) -> Tensor:
        """Apply scale ``si``'s ``Phi`` to ``h``: (B, C, H, W) -> (B, C, H, W)."""
        j = self.scale_to_phi[si]
        if self.share_quant_resi == 0:
            return self.get_submodule(str(j))(h)
        if self.share_quant_resi == 1:
            return self.qresi(h)
        return self.qresi_ls[j](h)
