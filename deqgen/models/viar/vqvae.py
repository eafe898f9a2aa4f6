"""VAR's multi-scale residual VQVAE tokenizer (``vae_ch160v4096z32``), written to match the official numerics.

An image ``(B, Cin, H, W)`` in ``[-1, 1]`` is encoded to a latent ``f`` of side ``patch_nums[-1]``. The
quantizer turns ``f`` into ``num_scales = len(patch_nums)`` token maps, coarse to fine: at scale ``si`` it
area-downsamples the residual to ``pn x pn``, takes the nearest codebook rows, bicubic-upsamples them back
to the latent side, refines them with a convolution ``Phi`` and subtracts the result from the residual.
The sum of the ``num_scales`` refined maps is ``f_hat``, which the decoder turns back into an image.

Parameter names equal the official state-dict keys, so an official checkpoint loads with
``load_state_dict(sd)`` (see :class:`MultiScaleVQVAE`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen.models.viar.config import PATCH_NUMS_256
from deqgen.models.viar.vqvae_nets import Decoder, Encoder, Phi, PhiBank, check_positive, phi_indices

__all__ = [
    "VQVAE_PRESETS",
    "MultiScaleQuantizer",
    "MultiScaleVQVAE",
    "Phi",
    "PhiBank",
    "QuantizerOutput",
    "VQVAEConfig",
    "VQVAEOutput",
    "phi_indices",
]

logger = logging.getLogger(__name__)

#: EMA decay of the per-scale codebook hit counts kept in ``quantize.ema_vocab_hit_SV`` during training.
HIT_EMA_DECAY = 0.99


@dataclass(frozen=True)
class VQVAEConfig:
    """Shape and quantizer settings of a :class:`MultiScaleVQVAE`. Defaults give ``vae_ch160v4096z32``.

    Attributes:
        vocab_size: codebook size ``V``.
        z_channels: latent channels ``Cvae`` (codebook row width).
        ch: base width of the conv trunk; must be a multiple of ``norm_groups``.
        ch_mult: width multiplier per encoder level. The encoder downsamples by ``2 ** (len(ch_mult) - 1)``:
            ``(1, 1, 2, 2, 4)`` gives 16x (official), ``(1, 2, 2)`` gives 4x.
        num_res_blocks: residual blocks per encoder level; the decoder uses ``num_res_blocks + 1``.
        patch_nums: token-map side per scale, strictly increasing; the last entry is the latent side.
        share_quant_resi: number of ``Phi`` convs: 0 gives one per scale, 1 one shared conv, ``n >= 2`` gives
            ``n`` convs spread over the scales (see :func:`phi_indices`).
        quant_resi: ``Phi(h) = (1 - r) h + r conv(h)`` with ``r = quant_resi`` in ``[0, 1]``; 0 makes ``Phi``
            the identity (no conv parameters).
        beta: commitment weight in the VQ loss ``beta * MSE(sg f_hat, f) + MSE(f_hat, sg f)``.
        using_znorm: pick codes by cosine similarity instead of squared L2 distance.
        in_channels: image channels (3 for RGB, 1 for grey digits).
        dropout: dropout rate inside the residual blocks.
        norm_groups: GroupNorm groups in the trunk (official 32); lets tiny models use ``ch = 16``.
        level_attention: attention blocks at the last, lowest-resolution trunk level (official True).
        mid_attention: attention block in the encoder's and decoder's mid blocks (official True).
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    beta: float = 0.25
    using_znorm: bool = False
    in_channels: int = 3
    dropout: float = 0.0
    norm_groups: int = 32
    level_attention: bool = True
    mid_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "in_channels", "norm_groups"):
            check_positive(name, getattr(self, name))
        if self.ch % self.norm_groups:
            raise ValueError(f"ch={self.ch} must be a multiple of norm_groups={self.norm_groups} (GroupNorm)")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        if not self.patch_nums or any(not isinstance(p, int) or p < 1 for p in self.patch_nums):
            raise ValueError(
                f"patch_nums must be a non-empty tuple of positive ints, got {self.patch_nums!r}"
            )
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must increase strictly (coarse to fine), got {self.patch_nums!r}")
        if not isinstance(self.share_quant_resi, int) or self.share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be an int >= 0, got {self.share_quant_resi!r}")
        if not 0.0 <= self.quant_resi <= 1.0:
            raise ValueError(f"quant_resi must be in [0, 1], got {self.quant_resi}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_scales(self) -> int:
        """``len(patch_nums)``, the number of token maps."""
        return len(self.patch_nums)

    @property
    def latent_size(self) -> int:
        """Side of the latent ``f``, ``patch_nums[-1]``."""
        return self.patch_nums[-1]

    @property
    def downsample_factor(self) -> int:
        """Encoder downsampling, ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """The image side the model expects, ``latent_size * downsample_factor``."""
        return self.latent_size * self.downsample_factor

    @property
    def seq_len(self) -> int:
        """``L = sum(pn * pn)``, tokens over all scales."""
        return sum(p * p for p in self.patch_nums)

    def with_(self, **changes: object) -> VQVAEConfig:
        """A copy with some fields changed (re-validated)."""
        return replace(self, **changes)  # type: ignore[arg-type]


#: Named configurations: the official 256-px tokenizer, and the tiny one of ``var_vqvae_tiny.pt``.
VQVAE_PRESETS: dict[str, VQVAEConfig] = {
    "vae_ch160v4096z32": VQVAEConfig(),
    "vae_tiny": VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)),
}


@dataclass(frozen=True)
class QuantizerOutput:
    """What :meth:`MultiScaleQuantizer.forward` returns.

    Attributes:
        fhat: (B, Cvae, h, w) quantized latent with a straight-through gradient to ``f``.
        vq_loss: scalar, ``beta * MSE(sg f_hat, f) + MSE(f_hat, sg f)`` averaged over the scales.
        indices: ``num_scales`` LongTensors (B, pn * pn), row-major.
        codebook_usage: (num_scales,) fraction of the codebook hit by this batch at each scale.
    """

    fhat: Tensor
    vq_loss: Tensor
    indices: list[Tensor]
    codebook_usage: Tensor


class MultiScaleQuantizer(nn.Module):
    """Multi-scale residual quantizer (official ``quantize`` submodule).

    State: ``embedding`` (V, Cvae), ``quant_resi`` (a :class:`PhiBank`) and the buffer
    ``ema_vocab_hit_SV`` (num_scales, V), an EMA of per-scale code hits updated by :meth:`forward` in training
    mode. The buffer is kept so official checkpoints load strictly; a checkpoint whose buffer has another
    scale count leaves this module's buffer unchanged, as the official loader does.

    Args:
        config: the model configuration (only the quantizer fields are read).
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        num_scales, V, C = config.num_scales, config.vocab_size, config.z_channels
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, V))
        self.quant_resi = PhiBank(C, config.quant_resi, num_scales, config.share_quant_resi)
        self.embedding = nn.Embedding(V, C)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape:
            logger.info("keeping own %s: checkpoint shape %s", key, tuple(state_dict[key].shape))
            state_dict[key] = self.ema_vocab_hit_SV
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    # ---- building blocks ------------------------------------------------------------------------------
    def phi_indices(self) -> list[int]:
        """The ``Phi`` conv used by each scale (see :func:`phi_indices`)."""
        return list(self.quant_resi.scale_to_phi)

    def nearest_codes(self, z_NC: Tensor) -> Tensor:
        """Nearest codebook rows: (N, Cvae) -> (N,) long, by squared L2 or by cosine if ``using_znorm``."""
        E_VC = self.embedding.weight.detach()
        if self.config.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC, dim=1).T, dim=1)
        # |z|^2 + |e|^2 - 2 z.e as one addmm, the reference's rounding.
        sq_NV = z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1)
        return torch.argmin(torch.addmm(sq_NV, z_NC, E_VC.T, beta=1, alpha=-2), dim=1)

    def embed(self, si: int, idx_Bl: Tensor) -> Tensor:
        """Codebook rows of scale ``si``'s tokens: (B, pn * pn) long -> (B, Cvae, pn, pn)."""
        pn = self.config.patch_nums[si]
        return self.embedding(idx_Bl).view(idx_Bl.shape[0], pn, pn, -1).permute(0, 3, 1, 2)

    def _to_latent_size(self, si: int, h_BChw: Tensor) -> Tensor:
        if si == self.config.num_scales - 1:
            return h_BChw.contiguous()
        side = self.config.latent_size
        return F.interpolate(h_BChw, size=(side, side), mode="bicubic", align_corners=False).contiguous()

    def _check_features(self, f: Tensor) -> None:
        C, side = self.config.z_channels, self.config.latent_size
        if f.ndim != 4 or f.shape[1] != C or f.shape[2] != side or f.shape[3] != side:
            raise ValueError(f"expected features of shape (B, {C}, {side}, {side}), got {tuple(f.shape)}")

    def check_indices(self, idx_list: Sequence[Tensor], count: int | None = None) -> None:
        """Raise ValueError unless ``idx_list`` holds ``count`` (default: all scales) int tensors (B, pn*pn)."""
        pns = self.config.patch_nums[: self.config.num_scales if count is None else count]
        if len(idx_list) != len(pns):
            raise ValueError(
                f"expected {len(pns)} index tensors (one per scale of {pns}), got {len(idx_list)}"
            )
        for si, (idx, pn) in enumerate(zip(idx_list, pns)):
            if idx.ndim != 2 or idx.shape[1] != pn * pn or idx.dtype.is_floating_point:
                raise ValueError(
                    f"scale {si}: expected integer indices of shape (B, {pn * pn}), got "
                    f"{idx.dtype} {tuple(idx.shape)}"
                )

    def _quantize_scale(self, si: int, rest: Tensor) -> tuple[Tensor, Tensor]:
        """Scale ``si`` of the residual pass: tokens (B, pn * pn) of ``rest`` (B, C, h, w) at side ``pn``
        and their refined contribution ``Phi_si(upsample(codes))`` (B, C, h, w)."""
        B, C = rest.shape[:2]
        pn = self.config.patch_nums[si]
        z_BChw = rest if si == self.config.num_scales - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        idx_Bl = self.nearest_codes(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
        return idx_Bl, self.quant_resi(si, self._to_latent_size(si, self.embed(si, idx_Bl)))

    # ---- image-side passes ----------------------------------------------------------------------------
    def features_to_indices_and_fhat(self, f: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Residual-quantize a latent.

        Args:
            f: (B, Cvae, h, w) latent with ``h = w = patch_nums[-1]``; used detached.

        Returns:
            ``(indices, fhat_per_scale)``: ``num_scales`` LongTensors (B, pn * pn) in row-major order, and
            ``num_scales`` tensors (B, Cvae, h, w), the cumulative ``f_hat`` after each scale.
        """
        self._check_features(f)
        rest = f.detach().clone()
        fhat = torch.zeros_like(rest)
        indices, fhats = [], []
        for si in range(self.config.num_scales):
            idx_Bl, h = self._quantize_scale(si, rest)
            fhat = fhat + h
            rest = rest - h
            indices.append(idx_Bl)
            fhats.append(fhat)
        return indices, fhats

    def forward(self, f: Tensor) -> QuantizerOutput:
        """Training pass: quantize ``f`` with the VQ loss and a straight-through gradient.

        Runs in float32 with autocast off. In training mode it also updates ``ema_vocab_hit_SV``.

        Args:
            f: (B, Cvae, h, w) latent.

        Returns:
            A :class:`QuantizerOutput`; its ``fhat`` equals the quantized latent in value and passes the
            gradient straight to ``f``.
        """
        self._check_features(f)
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            f_ng = f.detach()
            rest, fhat = f_ng.clone(), torch.zeros_like(f_ng)
            loss = f.new_zeros(())
            indices, usage = [], []
            for si in range(self.config.num_scales):
                idx_Bl, h = self._quantize_scale(si, rest)
                fhat = fhat + h
                rest = rest - h.detach()
                loss = loss + self.config.beta * F.mse_loss(fhat.detach(), f) + F.mse_loss(fhat, f_ng)
                hits_V = torch.bincount(idx_Bl.flatten(), minlength=self.config.vocab_size).float()
                if self.training:
                    with torch.no_grad():
                        self.ema_vocab_hit_SV[si].mul_(HIT_EMA_DECAY).add_(hits_V, alpha=1 - HIT_EMA_DECAY)
                indices.append(idx_Bl)
                usage.append((hits_V > 0).float().mean())
            fhat_st = (fhat.detach() - f_ng) + f
        return QuantizerOutput(fhat_st, loss / self.config.num_scales, indices, torch.stack(usage))

    # ---- token-side passes ----------------------------------------------------------------------------
    def indices_to_fhat(self, idx_list: Sequence[Tensor]) -> Tensor:
        """Sum of the refined, upsampled code maps of all scales.

        Args:
            idx_list: ``num_scales`` LongTensors (B, pn * pn).

        Returns:
            (B, Cvae, h, w) ``f_hat`` in the codebook's dtype.
        """
        self.check_indices(idx_list)
        side = self.config.latent_size
        fhat = self.embedding.weight.new_zeros(idx_list[0].shape[0], self.config.z_channels, side, side)
        for si, idx in enumerate(idx_list):
            fhat = fhat + self.quant_resi(si, self._to_latent_size(si, self.embed(si, idx)))
        return fhat

    def teacher_forcing_input(self, idx_list: Sequence[Tensor]) -> Tensor:
        """Transformer input for teacher forcing (official ``idxBl_to_var_input``).

        After accumulating scales ``0 .. num_scales-2`` into ``f_hat``, each step emits ``f_hat``
        area-downsampled to the next scale's side, flattened row-major.

        Args:
            idx_list: ``num_scales`` (or ``num_scales - 1``; the last scale is not used) LongTensors
                (B, pn * pn).

        Returns:
            (B, L - patch_nums[0] ** 2, Cvae); (B, 679, 32) for the default config, (B, 0, Cvae) if
            ``num_scales == 1``.
        """
        num_scales = self.config.num_scales
        if len(idx_list) not in (num_scales - 1, num_scales) or not idx_list:
            raise ValueError(
                f"expected {num_scales} index tensors (the last one is unused), got {len(idx_list)}"
            )
        self.check_indices(idx_list[: num_scales - 1], count=num_scales - 1)
        B, C, side = idx_list[0].shape[0], self.config.z_channels, self.config.latent_size
        fhat = self.embedding.weight.new_zeros(B, C, side, side)
        pieces = [fhat.new_zeros(B, 0, C)]
        for si in range(num_scales - 1):
            fhat = fhat + self.quant_resi(si, self._to_latent_size(si, self.embed(si, idx_list[si])))
            pn = self.config.patch_nums[si + 1]
            pieces.append(F.interpolate(fhat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(pieces, dim=1)

    def next_scale_input(self, si: int, fhat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One sampling step (official ``get_next_autoregressive_input``), without in-place updates.

        Args:
            si: the scale just sampled, ``0 <= si < num_scales``.
            fhat: (B, Cvae, h, w) accumulated ``f_hat`` of scales ``< si``; not modified.
            h_BChw: (B, Cvae, pn_si, pn_si) codebook rows of the sampled tokens (see :meth:`embed`).

        Returns:
            ``(fhat_new, next_input)``: a new tensor ``fhat + Phi_si(upsample(h))`` and, for
            ``si < num_scales - 1``, ``fhat_new`` area-downsampled to (B, Cvae, pn_{si+1}, pn_{si+1}); at the
            last scale ``next_input`` is ``fhat_new`` itself.
        """
        num_scales = self.config.num_scales
        if not 0 <= si < num_scales:
            raise ValueError(f"si must be in [0, {num_scales}), got {si}")
        fhat = fhat + self.quant_resi(si, self._to_latent_size(si, h_BChw))
        if si == num_scales - 1:
            return fhat, fhat
        pn = self.config.patch_nums[si + 1]
        return fhat, F.interpolate(fhat, size=(pn, pn), mode="area")


@dataclass(frozen=True)
class VQVAEOutput:
    """What :meth:`MultiScaleVQVAE.forward` returns.

    Attributes:
        recon: (B, Cin, H, W) reconstruction, not clamped (clamping would cut the gradient).
        vq_loss: scalar VQ loss (commitment + codebook), averaged over the scales.
        indices: ``num_scales`` LongTensors (B, pn * pn).
        codebook_usage: (num_scales,) fraction of the codebook hit by this batch at each scale.
    """

    recon: Tensor
    vq_loss: Tensor
    indices: list[Tensor] = field(repr=False)
    codebook_usage: Tensor


class MultiScaleVQVAE(nn.Module):
    """VAR's multi-scale VQVAE: ``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``, ``decoder``.

    Parameter and buffer names are the official state-dict keys. The buffer
    ``quantize.ema_vocab_hit_SV`` (num_scales, V) is kept (not dropped), so an official checkpoint loads with
    ``strict=True``; see :class:`MultiScaleQuantizer`. Module construction uses torch's default init; call
    :meth:`init_weights` before training from scratch.

    Args:
        config: shapes and quantizer settings (default: ``vae_ch160v4096z32``, 108,948,355 parameters).

    Example:
        >>> vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"]).eval()
        >>> idx = vae.img_to_indices(torch.zeros(1, 3, 64, 64))
        >>> [tuple(i.shape) for i in idx]
        [(1, 1), (1, 4), (1, 9), (1, 16)]
        >>> tuple(vae.indices_to_img(idx).shape)
        (1, 3, 64, 64)
    """

    def __init__(self, config: VQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else VQVAEConfig()
        trunk = {
            "ch": config.ch,
            "ch_mult": config.ch_mult,
            "num_res_blocks": config.num_res_blocks,
            "z_channels": config.z_channels,
            "dropout": config.dropout,
            "norm_groups": config.norm_groups,
            "level_attention": config.level_attention,
            "mid_attention": config.mid_attention,
        }
        self.encoder = Encoder(in_channels=config.in_channels, **trunk)  # type: ignore[arg-type]
        self.decoder = Decoder(out_channels=config.in_channels, **trunk)  # type: ignore[arg-type]
        self.quantize = MultiScaleQuantizer(config)
        C = config.z_channels
        self.quant_conv = nn.Conv2d(C, C, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(C, C, kernel_size=3, padding=1)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise for training from scratch, drawing only from ``generator`` when one is given.

        Convs get torch's default (Kaiming-uniform with ``a = sqrt(5)``, bias ``U(+-1/sqrt(fan_in))``),
        GroupNorm weight 1 and bias 0, the codebook ``U(-1/V, 1/V)`` (taming-transformers' choice) and
        the hit EMA zeros.

        Args:
            generator: source of randomness; the global RNG when ``None``.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=5**0.5, generator=generator)
                if module.bias is not None:
                    bound = (module.weight[0].numel()) ** -0.5
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        V = self.config.vocab_size
        nn.init.uniform_(self.quantize.embedding.weight, -1 / V, 1 / V, generator=generator)
        nn.init.zeros_(self.quantize.ema_vocab_hit_SV)

    def _check_image(self, img: Tensor) -> None:
        cfg, S = self.config, self.config.image_size
        if img.ndim != 4 or img.shape[1] != cfg.in_channels or img.shape[2] != S or img.shape[3] != S:
            raise ValueError(
                f"expected images of shape (B, {cfg.in_channels}, {S}, {S}): the latent side patch_nums[-1]="
                f"{cfg.latent_size} times the encoder's {cfg.downsample_factor}x downsampling; got {tuple(img.shape)}"
            )

    def phi_indices(self) -> list[int]:
        """The ``Phi`` conv used by each scale, e.g. ``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]`` (see :func:`phi_indices`)."""
        return self.quantize.phi_indices()

    def encode_features(self, img: Tensor) -> Tensor:
        """``f = quant_conv(encoder(img))``: (B, Cin, H, W) in ``[-1, 1]`` -> (B, Cvae, h, w).

        Raises:
            ValueError: when ``H, W`` differ from :attr:`VQVAEConfig.image_size`.
        """
        self._check_image(img)
        return self.quant_conv(self.encoder(img))

    def features_to_indices(self, f: Tensor) -> list[Tensor]:
        """Tokens of a latent: (B, Cvae, h, w) -> ``num_scales`` LongTensors (B, pn * pn), row-major."""
        return self.quantize.features_to_indices_and_fhat(f)[0]

    def features_to_indices_and_fhat(self, f: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Tokens and the cumulative ``f_hat`` (B, Cvae, h, w) after each scale; see :class:`MultiScaleQuantizer`."""
        return self.quantize.features_to_indices_and_fhat(f)

    def img_to_indices(self, img: Tensor) -> list[Tensor]:
        """Tokens of an image: (B, Cin, H, W) -> ``num_scales`` LongTensors (B, pn * pn)."""
        return self.features_to_indices(self.encode_features(img))

    def indices_to_fhat(self, idx_list: Sequence[Tensor]) -> Tensor:
        """``num_scales`` LongTensors (B, pn * pn) -> ``f_hat`` (B, Cvae, h, w)."""
        return self.quantize.indices_to_fhat(idx_list)

    def decode(self, fhat: Tensor) -> Tensor:
        """``decoder(post_quant_conv(fhat))`` clamped to ``[-1, 1]``: (B, Cvae, h, w) -> (B, Cin, H, W)."""
        return self.decoder(self.post_quant_conv(fhat)).clamp(-1, 1)

    def indices_to_img(self, idx_list: Sequence[Tensor]) -> Tensor:
        """``num_scales`` LongTensors (B, pn * pn) -> image (B, Cin, H, W) in ``[-1, 1]``."""
        return self.decode(self.indices_to_fhat(idx_list))

    def reconstruct(self, img: Tensor) -> Tensor:
        """Encode, quantize and decode: (B, Cin, H, W) -> (B, Cin, H, W) in ``[-1, 1]``."""
        return self.decode(self.features_to_indices_and_fhat(self.encode_features(img))[1][-1])

    def embed(self, si: int, idx_Bl: Tensor) -> Tensor:
        """Codebook rows of scale ``si``'s tokens: (B, pn * pn) -> (B, Cvae, pn, pn)."""
        return self.quantize.embed(si, idx_Bl)

    def teacher_forcing_input(self, idx_list: Sequence[Tensor]) -> Tensor:
        """Teacher-forcing input (B, L - patch_nums[0] ** 2, Cvae); see
        :meth:`MultiScaleQuantizer.teacher_forcing_input`."""
        return self.quantize.teacher_forcing_input(idx_list)

    def next_scale_input(self, si: int, fhat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One sampling step, returning ``(fhat_new, next_input)``; see :meth:`MultiScaleQuantizer.next_scale_input`."""
        return self.quantize.next_scale_input(si, fhat, h_BChw)

    def forward(self, img: Tensor) -> VQVAEOutput:
        """Training pass without any process group: reconstruction, VQ loss and tokens.

        The decoder sees the straight-through ``f_hat``, so the reconstruction loss reaches the encoder;
        the codebook and the ``Phi`` convs learn from ``vq_loss``.

        Args:
            img: (B, Cin, H, W) in ``[-1, 1]``.

        Returns:
            A :class:`VQVAEOutput`.
        """
        q = self.quantize(self.encode_features(img))
        recon = self.decoder(self.post_quant_conv(q.fhat))
        return VQVAEOutput(recon=recon, vq_loss=q.vq_loss, indices=q.indices, codebook_usage=q.codebook_usage)
