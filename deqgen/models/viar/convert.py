"""Official VAR / VIAR / VQVAE checkpoints -> deqgen (safetensors + JSON config), and back.

What is accepted:

* a bare state dict (``vae_ch160v4096z32.pth``, ``var_d30.pth``, the released ``viar.pth``), or a training
  checkpoint that holds one under ``["trainer"]["var_wo_ddp"]``, ``["trainer"]["vae_local"]``,
  ``["state_dict"]``, ``["model"]`` or ``["module"]`` (a ``module.`` prefix from DDP is stripped);
* read with ``torch.load(..., weights_only=True)`` only: a pickle holding anything but tensors and plain
  containers is refused with an error naming the file;
* the transformer kind is read from the keys (``blocks.*`` -> VAR, ``implicit_block.*`` -> VIAR) and its
  sizes from the shapes; ``patch_nums`` cannot be read from shapes alone and defaults to the 256-px pyramid
  when the sequence length is 680 (otherwise pass it).

Key map (everything else keeps its name): ``blocks.i.`` -> ``trunk.blocks.i.``, ``pre_blocks.i.`` ->
``trunk.pre_blocks.i.``, ``post_blocks.i.`` -> ``trunk.post_blocks.i.``, ``implicit_block.`` ->
``trunk.implicit.f.block.``, ``implicit_block_projection.{0,2}.`` -> ``trunk.implicit.f.projection.net.{0,2}.``,
``shared_ada_lin.1.`` -> ``shared_ada_lin.ada_lin.1.``. Dropped, because deqgen rebuilds them: the buffers
``lvl_1L``, ``attn_bias_for_masking`` and ``*.attn.zero_k_bias`` (checked to hold zeros). The VQVAE's names are
deqgen's names. Every tensor's shape is checked against a model built from the inferred config; missing,
unexpected and mis-shaped keys are all listed by name, and nothing is written when any is found.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deqgen.files import atomic_file
from deqgen.models.viar.config import PATCH_NUMS_256, ImplicitSpec, TransformerConfig
from deqgen.models.viar.export import (
    CheckpointError,
    check_state_dict,
    from_pretrained,
    load_converted,
    save_converted,
)
from deqgen.models.viar.model import NextScaleTransformer, build_model

__all__ = [
    "CheckpointError",
    "read_official",
    "official_to_deqgen_key",
    "deqgen_to_official_key",
    "infer_transformer_config",
    "convert_transformer",
    "convert_vqvae",
    "infer_vqvae_config",
    "to_official_transformer",
    "save_converted",
    "load_converted",
    "convert_checkpoint",
    "from_pretrained",
    "slim_checkpoint",
]

logger = logging.getLogger(__name__)

Kind = Literal["auto", "var", "viar", "vqvae"]

# (official pattern, deqgen replacement); applied in order, first match wins.
_TO_DEQGEN: tuple[tuple[str, str], ...] = (
    (r"^blocks\.(\d+)\.", r"trunk.blocks.\1."),
    (r"^pre_blocks\.(\d+)\.", r"trunk.pre_blocks.\1."),
    (r"^post_blocks\.(\d+)\.", r"trunk.post_blocks.\1."),
    (r"^implicit_block_projection\.(\d+)\.", r"trunk.implicit.f.projection.net.\1."),
    (r"^implicit_block\.", r"trunk.implicit.f.block."),
    (r"^shared_ada_lin\.1\.", r"shared_ada_lin.ada_lin.1."),
)
_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"^trunk\.blocks\.(\d+)\.", r"blocks.\1."),
    (r"^trunk\.pre_blocks\.(\d+)\.", r"pre_blocks.\1."),
    (r"^trunk\.post_blocks\.(\d+)\.", r"post_blocks.\1."),
    (r"^trunk\.implicit\.f\.projection\.net\.(\d+)\.", r"implicit_block_projection.\1."),
    (r"^trunk\.implicit\.f\.block\.", r"implicit_block."),
    (r"^shared_ada_lin\.ada_lin\.1\.", r"shared_ada_lin.1."),
)
# Buffers the official model stores and deqgen rebuilds.
_DROPPED = re.compile(r"^(lvl_1L|attn_bias_for_masking)$|\.attn\.zero_k_bias$")
_WRAPPERS = (("trainer", "var_wo_ddp"), ("trainer", "vae_local"), ("state_dict",), ("model",), ("module",))


# ---- reading ---------------------------------------------------------------------------------------------


def read_official(path: str | os.PathLike[str], *, allow_args: bool = False) -> dict[str, Tensor]:
    """Load an official ``.pth`` with ``torch.load(weights_only=True)`` and return its tensor state dict.

    The file is memory-mapped when it is in torch's zip format, so the tensors are read from disk on demand
    and converting needs about one copy of the model in memory, not two.

    Args:
        path: the official file.
        allow_args: also accept a training checkpoint (``ar-ckpt-*.pth``) that pickles the official run's
            ``args`` object (``utils.arg_util.Args`` or ``argparse.Namespace``): those classes, and only
            those, are allow-listed and rebuilt as inert stand-ins (:class:`OfficialArgs`), never by
            running the official code; the args are then dropped. Anything else that is not a tensor or a
            plain container is still refused.

    Returns:
        The model's state dict (a ``module.`` prefix from DDP stripped).

    Raises:
        CheckpointError: missing file, a pickle with other objects (naming what it found and the fix), no
            state dict inside, or a non-tensor entry in the state dict (naming it).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    obj = _torch_load(p, allow_args)
    sd = _unwrap(obj, p)
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{p}: state-dict entries that are not tensors: {', '.join(bad[:10])}; remove them (a state dict "
            "maps parameter names to tensors)"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


class OfficialArgs:
    """Inert stand-in for the official training ``args`` object: its attributes, no behaviour.

    :func:`read_official` with ``allow_args=True`` rebuilds a pickled ``utils.arg_util.Args`` (VAR / VIAR)
    or ``argparse.Namespace`` as this class, so the official code is never imported or run.
    """

    def __setstate__(self, state: object) -> None:
        """Keep the pickled attributes (a dict, or a ``(dict, slots)`` pair) as plain attributes."""
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


#: The only classes ``allow_args=True`` lets the unpickler build, and what it builds instead.
_ARGS_STAND_INS: tuple[tuple[type, str], ...] = (
    (OfficialArgs, "utils.arg_util.Args"),
    (OfficialArgs, "argparse.Namespace"),
)


def _torch_load(p: Path, allow_args: bool) -> Any:
    mmap = _is_zip(p)
    try:
        if allow_args:
            with torch.serialization.safe_globals(list(_ARGS_STAND_INS)):
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for arbitrary objects, RuntimeError for a torn zip
        hint = (
            ""
            if allow_args
            else (
                "; an official training checkpoint (ar-ckpt-*.pth) that pickles its args object loads with "
                "allow_args=True (`deqgen convert --slim`)"
            )
        )
        raise CheckpointError(
            f"{p}: cannot be read with torch.load(weights_only=True) "
            f"({type(e).__name__}: {_load_reason(e)}); "
            f"deqgen only reads tensors and plain containers, never arbitrary pickled objects{hint}"
        ) from None


def _load_reason(e: Exception) -> str:
    """The informative line of a torch.load error (for weights_only: the global it refused)."""
    text = str(e)
    m = re.search(r"Unsupported global: (GLOBAL \S+)", text)
    if m:
        return f"it pickles the object {m.group(1).removeprefix('GLOBAL ')}, which is not allowed"
    return text.splitlines()[0][:300] if text else ""


def _is_zip(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def slim_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write only the model's state dict of an official training checkpoint to ``dst`` (a plain ``.pth``).

    The official ``utils/save_slim.py`` step, without unpickling arbitrary objects: ``src`` is read with
    :func:`read_official` and ``allow_args=True``.

    Args:
        src: an official ``ar-ckpt-*.pth`` (or any file :func:`read_official` accepts).
        dst: the slim file, written atomically with ordinary permissions.

    Returns:
        ``dst``.
    """
    sd = read_official(src, allow_args=True)
    dst = Path(dst)
    with atomic_file(dst) as tmp:
        torch.save(sd, tmp)
    logger.info("wrote %s (%d tensors from %s)", dst, len(sd), src)
    return dst


def _unwrap(obj: Any, p: Path) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        for path in _WRAPPERS:
            cur: Any = obj
            for key in path:
                cur = cur.get(key) if isinstance(cur, Mapping) else None
            if isinstance(cur, Mapping) and cur:
                return _unwrap(cur, p)
        if any(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)  # a state dict; the caller names any non-tensor entry
    raise CheckpointError(
        f"{p}: no state dict found (expected a dict of tensors, or one under "
        f"{', '.join('/'.join(w) for w in _WRAPPERS)}); top-level keys: "
        f"{list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__}"
    )


# ---- key maps --------------------------------------------------------------------------------------------


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def official_to_deqgen_key(key: str) -> str | None:
    """deqgen name of an official transformer key, or ``None`` for a buffer deqgen rebuilds."""
    return None if _DROPPED.search(key) else _rename(key, _TO_DEQGEN)


def deqgen_to_official_key(key: str) -> str:
    """Official name of a deqgen transformer key."""
    return _rename(key, _TO_OFFICIAL)


# ---- transformer -----------------------------------------------------------------------------------------


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _need(sd: Mapping[str, Tensor], key: str, src: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{src}: missing key {key!r}, needed to read the model's sizes")
    return sd[key]


def infer_transformer_config(
    sd: Mapping[str, Tensor], *, patch_nums: tuple[int, ...] | None = None, src: str = "state dict"
) -> TransformerConfig:
    """Read a :class:`TransformerConfig` from an official VAR / VIAR state dict's keys and shapes.

    The nominal depth (which sets drop-path rates and init, not shapes) is ``C / 64`` as in the official
    sizing. ``patch_nums`` defaults to the 256-px pyramid when the sequence length is 680.
    """
    n_cls, C = _need(sd, "class_emb.weight", src).shape
    L = _need(sd, "pos_1LC", src).shape[1]
    num_scales = _need(sd, "lvl_embed.weight", src).shape[0]
    V = _need(sd, "head.weight", src).shape[0]
    Cv = _need(sd, "word_embed.weight", src).shape[1]
    if patch_nums is None:
        if L != sum(p * p for p in PATCH_NUMS_256) or num_scales != len(PATCH_NUMS_256):
            raise CheckpointError(
                f"{src}: sequence length {L} over {num_scales} scales is not the 256-px pyramid; "
                "pass patch_nums"
            )
        patch_nums = PATCH_NUMS_256
    if sum(p * p for p in patch_nums) != L or len(patch_nums) != num_scales:
        raise CheckpointError(
            f"{src}: patch_nums {patch_nums} give L={sum(p * p for p in patch_nums)} "
            f"over {len(patch_nums)} scales, but the checkpoint has L={L} "
            f"over {num_scales}"
        )
    scale_keys = [k for k in sd if k.endswith("attn.scale_mul_1H11")]
    heads = sd[scale_keys[0]].shape[1] if scale_keys else max(C // 64, 1)
    fc1 = [k for k in sd if k.endswith("ffn.fc1.weight")]
    mlp_ratio = sd[fc1[0]].shape[0] / C if fc1 else 4.0
    common = dict(
        embed_dim=C,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        patch_nums=tuple(patch_nums),
        vocab_size=V,
        z_channels=Cv,
        num_classes=n_cls - 1,
        attn_l2_norm=bool(scale_keys),
        shared_aln=any(k.startswith("shared_ada_lin.") for k in sd),
    )
    depth_c = max(C // 64, 1)
    if any(k.startswith("implicit_block.") for k in sd):
        pre, post = _count(sd, "pre_blocks"), _count(sd, "post_blocks")
        depth = max(depth_c, pre + post + 1)
        return TransformerConfig(depth=depth, implicit=ImplicitSpec(pre_depth=pre, post_depth=post), **common)
    depth = _count(sd, "blocks")
    if depth == 0:
        raise CheckpointError(f"{src}: neither 'blocks.*' (VAR) nor 'implicit_block.*' (VIAR) keys found")
    return TransformerConfig(depth=depth, **common)  # type: ignore[arg-type]


def convert_transformer(
    sd: Mapping[str, Tensor],
    cfg: TransformerConfig | None = None,
    *,
    patch_nums: tuple[int, ...] | None = None,
    src: str = "state dict",
) -> tuple[dict[str, Tensor], TransformerConfig]:
    """Official VAR / VIAR state dict -> ``(deqgen state dict, config)``, fully checked.

    Raises:
        CheckpointError: missing / unexpected / mis-shaped keys (all listed), or a non-zero dropped buffer.
    """
    cfg = cfg or infer_transformer_config(sd, patch_nums=patch_nums, src=src)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = official_to_deqgen_key(k)
        if new is None:
            if k.endswith("zero_k_bias") and bool(v.any()):
                raise CheckpointError(f"{src}: {k} should hold zeros (a constant of the official model)")
            continue
        out[new] = v
    with torch.device("meta"):
        ref = build_model(cfg, init=False)
    check_state_dict(ref, out, src, f" built from {cfg}")
    return out, cfg


def to_official_transformer(model: NextScaleTransformer) -> dict[str, Tensor]:
    """deqgen model -> official-layout state dict (the official buffers included), e.g. for golden tests."""
    sd = {deqgen_to_official_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    if any("parametrizations" in k for k in sd):
        raise CheckpointError("a weight-normalised model has no official layout; remove weight_norm first")
    cfg = model.cfg
    sd["lvl_1L"] = model.lvl_1L.clone()
    sd["attn_bias_for_masking"] = model.attn_bias[None, None].clone()
    for k in [k for k in sd if k.endswith("attn.q_bias")]:
        sd[k.replace("q_bias", "zero_k_bias")] = torch.zeros(cfg.width, dtype=sd[k].dtype)
    return sd


# ---- VQVAE -----------------------------------------------------------------------------------------------


def infer_vqvae_config(
    sd: Mapping[str, Tensor], *, patch_nums: tuple[int, ...] | None = None, src: str = "state dict"
) -> Any:
    """Read a ``VQVAEConfig`` from an official VQVAE state dict's keys and shapes.

    ``patch_nums`` defaults to the 256-px pyramid when the usage buffer has 10 rows (official layout);
    ``norm_groups`` cannot be read from shapes and stays 32 (the official value).
    """
    from deqgen.models.viar.vqvae import VQVAEConfig

    ch, in_ch = _need(sd, "encoder.conv_in.weight", src).shape[:2]
    V, Cv = _need(sd, "quantize.embedding.weight", src).shape
    levels = _count(sd, "encoder.down")
    ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels))
    n_res = _count(sd, "encoder.down.0.block")
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = _count(sd, "quantize.quant_resi.qresi_ls")
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in sd):
        share = 1
    else:
        share = _count(sd, "quantize.quant_resi")
    if patch_nums is None:
        num_scales = sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else None
        if num_scales != len(PATCH_NUMS_256):
            raise CheckpointError(
                f"{src}: the tokenizer's scale pyramid cannot be read from the keys; pass patch_nums"
            )
        patch_nums = PATCH_NUMS_256
    return VQVAEConfig(
        vocab_size=V,
        z_channels=Cv,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=n_res,
        patch_nums=tuple(patch_nums),
        share_quant_resi=share,
        in_channels=in_ch,
        level_attention=any(k.startswith(f"encoder.down.{levels - 1}.attn.") for k in sd),
        mid_attention=any(k.startswith("encoder.mid.attn_1.") for k in sd),
    )


def convert_vqvae(
    sd: Mapping[str, Tensor],
    cfg: Any = None,
    *,
    patch_nums: tuple[int, ...] | None = None,
    src: str = "state dict",
) -> tuple[dict[str, Tensor], Any]:
    """Official VQVAE state dict -> ``(deqgen state dict, VQVAEConfig)``, fully checked.

    The names are deqgen's already; a codebook-usage buffer with another scale count is replaced by zeros.
    """
    from deqgen.models.viar.vqvae import MultiScaleVQVAE

    cfg = cfg or infer_vqvae_config(sd, patch_nums=patch_nums, src=src)
    with torch.device("meta"):
        ref = MultiScaleVQVAE(cfg)
    want = ref.state_dict()
    out = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    ema = "quantize.ema_vocab_hit_SV"
    if ema in out and tuple(out[ema].shape) != tuple(want[ema].shape):
        out[ema] = torch.zeros(want[ema].shape)
    check_state_dict(ref, out, src, f" built from {cfg}")
    return out, cfg


def _detect(sd: Mapping[str, Tensor]) -> str:
    if any(k.startswith("implicit_block.") for k in sd):
        return "viar"
    if any(k.startswith("blocks.") for k in sd):
        return "var"
    if any(k.startswith("encoder.") for k in sd) and any(k.startswith("quantize.") for k in sd):
        return "vqvae"
    raise CheckpointError(f"cannot tell the model kind from the keys (first keys: {list(sd)[:8]})")


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    kind: Kind = "auto",
    patch_nums: tuple[int, ...] | None = None,
    allow_args: bool = False,
    licence: str | None = None,
) -> Path:
    """Read an official ``.pth`` and write a deqgen checkpoint directory (see the module docstring).

    Args:
        src: the official file (``vae_ch160v4096z32.pth``, ``var_d30.pth``, ``viar.pth``, ``ar-ckpt-*.pth``).
        dst: output directory (``model.safetensors`` + ``config.json``), written atomically.
        kind: ``"auto"`` reads it from the keys.
        patch_nums: the token pyramid, if not the 256-px one.
        allow_args: accept an official training checkpoint that pickles its args object (see
            :func:`read_official`); what ``deqgen convert --slim`` passes.
        licence: the weights' licence, written into the model card.

    Returns:
        ``dst``. Nothing is written when the checkpoint does not match.
    """
    sd = read_official(src, allow_args=allow_args)
    detected = _detect(sd)
    if kind != "auto" and kind != detected:
        raise CheckpointError(f"{src}: asked for kind={kind!r} but the keys say {detected!r}")
    if detected == "vqvae":
        out, cfg = convert_vqvae(sd, patch_nums=patch_nums, src=str(src))
    else:
        out, cfg = convert_transformer(sd, patch_nums=patch_nums, src=str(src))
    return save_converted(dst, out, detected, cfg, source=Path(src).name, licence=licence)
