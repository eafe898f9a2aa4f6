"""A converted model directory: write it (with a model card), recognise it, and load it back.

Layout, as model hubs use it::

    my_model/
      model.safetensors   the weights (deqgen names)
      config.json         {"kind": "var" | "viar" | "vqvae", "config": {...}, "format": 1}
      README.md           model card: kind, config, parameter count, source, licence

:func:`save_converted` writes only into a new directory, an empty one, or one that holds a previous
conversion (these three files and nothing else); anything else is refused, so a user's other files are never
deleted. Files get the permissions the user's umask gives ordinary files (:mod:`deqgen.files`). The weights
are streamed to disk tensor by tensor, so writing needs no second copy of the model in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deqgen.errors import CheckpointError
from deqgen.files import atomic_dir, atomic_file, atomic_write_text
from deqgen.models.viar.config import TransformerConfig
from deqgen.models.viar.model import build_model

__all__ = [
    "CONVERTED_FILES",
    "CheckpointError",
    "check_state_dict",
    "config_from_dict",
    "config_to_dict",
    "from_pretrained",
    "is_conversion",
    "load_converted",
    "model_card",
    "save_converted",
    "write_safetensors",
]

logger = logging.getLogger(__name__)

#: The files a converted directory holds; a directory with exactly these (or a subset) is a conversion.
CONVERTED_FILES = ("model.safetensors", "config.json", "README.md")
KINDS = ("var", "viar", "vqvae")

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], src: str, hint: str = "") -> None:
    """Raise :class:`CheckpointError` listing every missing, unexpected and mis-shaped key of ``sd``.

    Args:
        model: the reference model (the meta device is fine).
        sd: the state dict to check.
        src: where ``sd`` came from, for the message.
        hint: appended to "does not match the model" (e.g. the config it was built from).
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want[k]}"
        for k in sorted(set(want) & set(sd))
        if tuple(sd[k].shape) != want[k]
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:20]}")
        raise CheckpointError(f"{src} does not match the model{hint}: " + "; ".join(parts))


# ---- configs ---------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready plain data (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(kind: str, raw: Mapping[str, Any]) -> Any:
    """Rebuild the config of a ``kind`` model from :func:`config_to_dict` output (e.g. read from JSON).

    The config classes normalise their fields (lists to tuples), so the result compares equal to the
    config that was saved.

    Raises:
        CheckpointError: an unknown kind, or fields the config does not have.
    """
    if kind in ("var", "viar"):
        cls: Any = TransformerConfig
    elif kind == "vqvae":
        from deqgen.models.viar.vqvae import VQVAEConfig

        cls = VQVAEConfig
    else:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise CheckpointError(f"config.json does not describe a {cls.__name__}: {e}") from None


# ---- the directory ---------------------------------------------------------------------------------------


def is_conversion(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by :func:`save_converted` (its own files and no others)."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = {c.name for c in p.iterdir()}
    if not names or not names <= set(CONVERTED_FILES) or "config.json" not in names:
        return False
    try:
        return json.loads((p / "config.json").read_text()).get("kind") in KINDS
    except (OSError, ValueError, AttributeError):
        return False


def _check_destination(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(
            f"destination {dst} is a file; give a directory (new, empty, or a previous conversion)"
        )
    if not dst.is_dir() or not any(dst.iterdir()) or is_conversion(dst):
        return
    others = sorted(c.name for c in dst.iterdir() if c.name not in CONVERTED_FILES)
    listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    raise CheckpointError(
        f"destination {dst} already holds other files ({listed}); "
        "deqgen writes a conversion only into a new or empty directory or over a previous conversion, and "
        f"never deletes other files: choose a new directory, e.g. {dst / 'converted'}"
    )


def save_converted(
    dst: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    kind: str,
    cfg: Any,
    *,
    source: str | None = None,
    licence: str | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a ``README.md`` model card into ``dst``.

    A new ``dst`` appears complete or not at all (a temp directory renamed into place). An empty ``dst``
    (``.`` included) or a previous conversion gets each file replaced atomically, the config last.

    Args:
        dst: the output directory: new, empty, or a previous conversion.
        state_dict: deqgen-named tensors; streamed to disk one at a time.
        kind: ``"var"``, ``"viar"`` or ``"vqvae"``.
        cfg: the model's config dataclass.
        source: where the weights came from (e.g. the official file name), for the model card.
        licence: the weights' licence, for the model card (``None``: "see the source").

    Returns:
        ``dst``.

    Raises:
        CheckpointError: ``dst`` is a file, or a directory with files that are not a conversion's; an unknown
            ``kind``; a non-tensor entry.
    """
    if kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"state dict entries that are not tensors: {bad[:10]}")
    dst = Path(dst)
    _check_destination(dst)
    meta = {"kind": kind, "format": 1, "config": config_to_dict(cfg)}
    card = model_card(kind, cfg, state_dict, source=source, licence=licence)
    if dst.is_dir():
        with atomic_file(dst / "model.safetensors") as tmp:
            write_safetensors(tmp, state_dict, {"kind": kind})
        atomic_write_text(dst / "README.md", card)
        atomic_write_text(dst / "config.json", json.dumps(meta, indent=2))
    else:
        with atomic_dir(dst) as tmp:
            write_safetensors(tmp / "model.safetensors", state_dict, {"kind": kind})
            (tmp / "README.md").write_text(card)
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    logger.info("wrote %s (%s, %d tensors)", dst, kind, len(state_dict))
    return dst


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file one tensor at a time (no in-memory copy of the whole model).

    The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
    header with each tensor's dtype, shape and byte range, then the raw little-endian bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                fh.write(memoryview(flat.view(torch.uint8).numpy()))


def model_card(
    kind: str, cfg: Any, state_dict: Mapping[str, Tensor], *, source: str | None, licence: str | None
) -> str:
    """The ``README.md`` written beside the weights: what the model is, its size, config, source, licence."""
    n_params = sum(v.numel() for k, v in state_dict.items() if v.is_floating_point() and "ema_vocab" not in k)
    title = {
        "var": "VAR (explicit next-scale transformer)",
        "viar": "VIAR (implicit next-scale transformer)",
        "vqvae": "Multi-scale VQVAE tokenizer",
    }[kind]
    lines = [
        f"# {title}",
        "",
        "Converted with deqgen. Load it with:",
        "",
        "```python",
        "from deqgen.models.viar import from_pretrained",
        "",
        'model = from_pretrained("path/to/this/directory")',
        "```",
        "",
        "| field | value |",
        "|---|---|",
        f"| kind | `{kind}` |",
        f"| parameters | {n_params:,} |",
        f"| source | {source or 'not recorded'} |",
        f"| licence | {licence or 'that of the source weights (see the source)'} |",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config_to_dict(cfg), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def load_converted(src: str | os.PathLike[str], **build_kw: Any) -> nn.Module:
    """Build the model described by ``src/config.json`` and load ``src/model.safetensors`` strictly.

    Needs no official code and no network. ``build_kw`` goes to :func:`~deqgen.models.viar.model.build_model`
    for transformers (e.g. ``eval_solver=``, ``attention_backend=``).

    Raises:
        CheckpointError: unreadable or inconsistent files (the message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(src)
    try:
        meta = json.loads((src / "config.json").read_text())
        kind, raw = meta["kind"], meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{src / 'config.json'}: unreadable ({e}); convert the checkpoint again"
        ) from None
    cfg = config_from_dict(kind, raw)
    try:
        sd = load_file(str(src / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{src / 'model.safetensors'}: unreadable ({e})") from None
    model: nn.Module
    if kind == "vqvae":
        from deqgen.models.viar.vqvae import MultiScaleVQVAE

        model = MultiScaleVQVAE(cfg)
    else:
        model = build_model(cfg, init=False, **build_kw)
    check_state_dict(model, sd, str(src / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    return model


def from_pretrained(path: str | os.PathLike[str], **build_kw: Any) -> nn.Module:
    """Load a converted model for inference: :func:`load_converted`, in eval mode, gradients off.

    Args:
        path: a converted directory, or its ``config.json`` / ``model.safetensors``.
        **build_kw: passed to :func:`load_converted` (e.g. ``attention_backend="sdpa"``).

    Returns:
        The VAR / VIAR transformer or the VQVAE, in eval mode with ``requires_grad`` off.

    Raises:
        CheckpointError: ``path`` is not a converted directory (the message says how to make one).
    """
    p = Path(path)
    if p.is_file() and p.name in CONVERTED_FILES:
        p = p.parent
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"{p} is not a converted model directory (no config.json); make one with "
            f"`deqgen convert OFFICIAL.pth {p}`"
        )
    model = load_converted(p, **build_kw).eval()
    model.requires_grad_(False)
    return model
