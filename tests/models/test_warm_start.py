"""Warm start in VIAR sampling: each scale's first iterate is the previous scale's iterate, bilinearly
upsampled, and not the pre blocks' output (the cold start).

A forward hook on the implicit map records every call ``f(z_k, x, k)``. The upsampling is recomputed here
with ``F.interpolate`` on the token grid, independently of the library's ``upsample_tokens``. If ``generate``
silently dropped the warm start (``z0 = None``), the first iterate of every scale after the first would be
the cold start and :func:`test_warm_start_begins_each_scale_from_the_previous_iterate_upsampled` fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from deqgen.models.viar.model import build_model
from deqgen.models.viar.sampling import generate
from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE


def _model_and_vae() -> tuple[torch.nn.Module, MultiScaleVQVAE]:
    model = build_model("viar_tiny", generator=torch.Generator().manual_seed(1)).double().eval()
    vae = MultiScaleVQVAE(VQVAE_PRESETS["vae_tiny"])
    vae.init_weights(torch.Generator().manual_seed(2))
    return model, vae.double().eval()


def _record_calls(
    model: torch.nn.Module, warm_start: bool, cfg_scale: float
) -> dict[int, list[tuple[Tensor, Tensor]]]:
    """``{scale: [(z_k, f(z_k)), ...]}`` of one ``generate`` call with a constant 5-iteration Picard schedule."""
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def hook(_module: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        z, x, _k = args
        calls.setdefault(x.scale, []).append((z.detach().clone(), output.detach().clone()))

    _, vae = _model_and_vae()
    handle = model.trunk.map.register_forward_hook(hook)
    try:
        generate(
            model,
            vae,
            torch.tensor([0, 3, 7]),
            schedule="constant:5",
            cfg_scale=cfg_scale,
            seed=0,
            warm_start=warm_start,
        )
    finally:
        handle.remove()
    return calls


def _bilinear(z_BnC: Tensor, side_to: int) -> Tensor:
    """Resize a row-major token grid ``(B, n, C)`` to ``(B, side_to^2, C)`` (align_corners=False)."""
    B, n, C = z_BnC.shape
    side = int(round(n**0.5))
    grid = z_BnC.reshape(B, side, side, C).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(side_to, side_to), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1).reshape(B, side_to * side_to, C)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_warm_start_begins_each_scale_from_the_previous_iterate_upsampled(cfg_scale: float) -> None:
    model, _ = _model_and_vae()
    warm, cold = _record_calls(model, True, cfg_scale), _record_calls(model, False, cfg_scale)
    patch_nums = model.cfg.patch_nums
    assert sorted(warm) == list(range(len(patch_nums)))
    for s in range(1, len(patch_nums)):
        first_warm, first_cold = warm[s][0][0], cold[s][0][0]
        prev = [z for pair in warm[s - 1] for z in pair]  # every iterate the previous scale produced
        candidates = [_bilinear(z, patch_nums[s]) for z in prev]
        assert any(torch.allclose(first_warm, c, rtol=0, atol=1e-12) for c in candidates), f"scale {s}"
        # the cold start (the pre blocks' output) is a different point: the check above can fail
        assert not torch.allclose(first_warm, first_cold, rtol=0, atol=1e-6), f"scale {s}"
        assert not any(torch.allclose(first_cold, c, rtol=0, atol=1e-6) for c in candidates), f"scale {s}"
    # scale 0 has no previous scale: both start cold, from the same point
    assert torch.equal(warm[0][0][0], cold[0][0][0])


def test_warm_start_changes_what_the_solver_sees_at_later_scales() -> None:
    """The warm start is not only recorded but used: the map's outputs at scale 1 differ from a cold run."""
    model, _ = _model_and_vae()
    warm, cold = _record_calls(model, True, 0.0), _record_calls(model, False, 0.0)
    assert not torch.allclose(warm[1][0][1], cold[1][0][1], rtol=0, atol=1e-6)
