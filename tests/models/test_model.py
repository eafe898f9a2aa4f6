"""VAR / VIAR transformer: parameter counts, an independent reference forward, cached == teacher forced."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deqgen import Anderson, Picard
from deqgen.gradients import JFB, SJFB
from deqgen.models.viar.config import PRESETS, ImplicitSpec, TransformerConfig, preset
from deqgen.models.viar.model import build_model

# Official parameter counts (obtained by running the official classes of FoundationVision/VAR and mobiushy/VIAR).
OFFICIAL_COUNTS = {
    "var_d16": 310_283_520,
    "var_d20": 600_917_136,
    "var_d24": 1_033_399_360,
    "var_d30": 2_010_020_356,
    "viar_d16": 222_134_448,
    "viar_d20": 345_169_116,
    "viar_d24": 495_204_616,
    "viar_d30": 770_884_426,
}


def _count(name: str) -> int:
    with torch.device("meta"):
        m = build_model(name, init=False)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_equal_official(name: str) -> None:
    assert _count(name) == OFFICIAL_COUNTS[name]


def test_d30_block_and_projection_counts() -> None:
    with torch.device("meta"):
        m = build_model("viar_d30", init=False)
    blk = m.trunk.map.block
    assert sum(p.numel() for p in blk.parameters()) == 66_382_110
    assert sum(p.numel() for p in m.trunk.map.projection.parameters()) == 22_124_160


def test_presets_have_expected_shapes() -> None:
    cfg = PRESETS["viar_d30"]
    assert (cfg.width, cfg.heads, cfg.seq_len, cfg.num_scales) == (1920, 30, 680, 10)
    assert cfg.block_indices()["implicit_block"] == [15]
    rates = cfg.drop_path_rates()
    assert rates[15] == pytest.approx(0.06466, abs=1e-5) and rates[29] == pytest.approx(0.125)
    with pytest.raises(KeyError, match="unknown preset"):
        preset("viar_d31")


# ---- an independent reference forward, written from the official VAR/VIAR code's formulas ----------------------


def _ref_block(P: dict, pre: str, x, cond, mask, C: int, H: int):
    B, L, _ = x.shape
    hd = C // H
    ada = F.linear(F.silu(cond), P[pre + "ada_lin.1.weight"], P[pre + "ada_lin.1.bias"]).view(B, 1, 6, C)
    g1, g2, s1, s2, b1, b2 = ada.unbind(2)

    def ln(t):
        return F.layer_norm(t, (C,), eps=1e-6)

    h = ln(x) * (1 + s1) + b1
    qkv_bias = torch.cat([P[pre + "attn.q_bias"], torch.zeros(C, dtype=x.dtype), P[pre + "attn.v_bias"]])
    qkv = (h @ P[pre + "attn.mat_qkv.weight"].T + qkv_bias).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q / q.norm(dim=-1, keepdim=True) * torch.exp(P[pre + "attn.scale_mul_1H11"].clamp(max=math.log(100)))
    k = k / k.norm(dim=-1, keepdim=True)
    logits = q @ k.transpose(-1, -2) + mask
    att = torch.softmax(logits, dim=-1) @ v
    att = att.transpose(1, 2).reshape(B, L, C)
    x = x + (att @ P[pre + "attn.proj.weight"].T + P[pre + "attn.proj.bias"]) * g1
    h = ln(x) * (1 + s2) + b2
    h = F.gelu(h @ P[pre + "ffn.fc1.weight"].T + P[pre + "ffn.fc1.bias"], approximate="tanh")
    return x + (h @ P[pre + "ffn.fc2.weight"].T + P[pre + "ffn.fc2.bias"]) * g2


def _ref_forward(model, labels, feats, K: int | None):
    """Teacher-forced logits from raw parameters; VIAR runs ``K`` weight-tied applications from z0 = u."""
    cfg = model.cfg
    P = {k: v for k, v in model.state_dict().items()}
    C, H = cfg.width, cfg.heads
    B = labels.shape[0]
    levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])
    mask = torch.where(levels[:, None] >= levels[None, :], 0.0, -math.inf).to(feats.dtype)
    cond = P["class_emb.weight"][labels]
    x = torch.cat(
        [cond[:, None] + P["pos_start"], feats @ P["word_embed.weight"].T + P["word_embed.bias"]], 1
    )
    x = x + P["lvl_embed.weight"][levels] + P["pos_1LC"]
    if cfg.implicit is None:
        for i in range(cfg.depth):
            x = _ref_block(P, f"trunk.blocks.{i}.", x, cond, mask, C, H)
    else:
        for i in range(cfg.implicit.pre_depth):
            x = _ref_block(P, f"trunk.pre_blocks.{i}.", x, cond, mask, C, H)
        u, z = x, x
        for _ in range(K):
            zu = torch.cat([z, u], -1)
            h = F.gelu(
                zu @ P["trunk.implicit.f.projection.net.0.weight"].T
                + P["trunk.implicit.f.projection.net.0.bias"],
                approximate="tanh",
            )
            h = (
                h @ P["trunk.implicit.f.projection.net.2.weight"].T
                + P["trunk.implicit.f.projection.net.2.bias"]
            )
            z = _ref_block(P, "trunk.implicit.f.block.", h, cond, mask, C, H)
        x = z
        for i in range(cfg.implicit.post_depth):
            x = _ref_block(P, f"trunk.post_blocks.{i}.", x, cond, mask, C, H)
    ss = F.linear(F.silu(cond), P["head_nm.ada_lin.1.weight"], P["head_nm.ada_lin.1.bias"]).view(B, 1, 2, C)
    h = F.layer_norm(x, (C,), eps=1e-6) * (1 + ss[:, :, 0]) + ss[:, :, 1]
    return h @ P["head.weight"].T + P["head.bias"]


def _model(name: str, *, seed: int = 0, jitter: float = 0.05, **changes) -> torch.nn.Module:
    """A float64 model with its init perturbed, so no block is close to the identity."""
    cfg = preset(name, **changes)
    m = build_model(cfg, generator=torch.Generator().manual_seed(seed)).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(jitter * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _inputs(m, B: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, m.cfg.seq_len - m.first_l, m.cfg.z_channels, generator=g, dtype=torch.float64)
    labels = torch.randint(0, m.cfg.num_classes + 1, (B,), generator=g)
    return labels, feats


def test_var_matches_reference_forward() -> None:
    m = _model("var_tiny")
    labels, feats = _inputs(m)
    with torch.no_grad():
        got, _ = m(labels, feats)
    torch.testing.assert_close(got, _ref_forward(m, labels, feats, None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 3, 7])
def test_viar_equals_K_weight_tied_applications(K: int) -> None:
    m = _model("viar_tiny")
    m.trunk.implicit.eval_solver = Picard(tol=None, max_iter=K)
    labels, feats = _inputs(m)
    with torch.no_grad():
        got, stats = m(labels, feats)
    assert stats.solution is not None and stats.solution.stats.iterations == K
    torch.testing.assert_close(got, _ref_forward(m, labels, feats, K), rtol=1e-10, atol=1e-10)


def _cached_logits(m, labels, feats, *, solver=None, policy="iteration"):
    cache = m.new_cache(policy)
    cond = m.condition(labels)
    out, stats = [], []
    for s, sl in enumerate(m.slices):
        f = None if s == 0 else feats[:, sl.start - m.first_l : sl.stop - m.first_l]
        lo, st = m.forward_scale(s, cond, f, cache, solver=solver)
        out.append(lo)
        stats.append(st)
    return torch.cat(out, 1), stats, cache


@pytest.mark.parametrize("name", ["var_tiny", "viar_tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_forward_equals_teacher_forced(name: str, dtype: torch.dtype) -> None:
    m = _model(name).to(dtype)
    labels, feats = _inputs(m)
    feats = feats.to(dtype)
    with torch.no_grad():
        full, _ = m(labels, feats)
        cached, _, cache = _cached_logits(m, labels, feats)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(cached, full, rtol=tol, atol=tol)
    assert cache.nbytes() > 0


def test_viar_cached_with_a_tolerance_solver_reports_per_sample_stats() -> None:
    m = _model("viar_tiny", jitter=0.0)  # the init is contractive: blocks start near the identity
    labels, feats = _inputs(m, B=4)
    with torch.no_grad():
        _, stats, _ = _cached_logits(m, labels, feats, solver=Anderson(tol=1e-8, max_iter=40))
    for st in stats:
        sol = st.solution
        assert sol is not None and sol.stats.nfe.shape == (4,)
        assert bool((sol.stats.rel_residual <= 1e-8).all())


def test_fourteen_scales_and_other_pyramids_work() -> None:
    """The official VIAR raises IndexError beyond 10 scales; any pyramid works here."""
    pn = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
    m = _model("viar_tiny", patch_nums=pn)
    m.trunk.implicit.eval_solver = Picard(tol=None, max_iter=3)
    labels, feats = _inputs(m, B=2)
    with torch.no_grad():
        full, _ = m(labels, feats)
        cached, stats, _ = _cached_logits(m, labels, feats)
    assert full.shape == (2, sum(p * p for p in pn), m.cfg.vocab_size) and len(stats) == 14
    torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-10)


def test_viar_training_draws_one_drop_mask_per_forward() -> None:
    cfg = preset("viar_tiny", drop_path_rate=0.5, dropout=0.1)
    m = build_model(
        cfg, gradient=SJFB(no_grad=(3, 3), with_grad=(2, 2)), generator=torch.Generator().manual_seed(0)
    )
    blk = m.trunk.map.block
    draws, calls = [], []
    orig_draw = blk.draw_masks
    blk.draw_masks = lambda x, g=None: draws.append(1) or orig_draw(x, g)  # type: ignore[method-assign]
    blk.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["masks"]), with_kwargs=True)
    labels, feats = torch.tensor([0, 1]), torch.randn(2, cfg.seq_len - 1, cfg.z_channels)
    m.train()
    logits, stats = m(labels, feats, generator=torch.Generator().manual_seed(1))
    assert (stats.no_grad_steps, stats.grad_steps) == (3, 2)
    assert len(draws) == 1 and len(calls) == 5
    assert all(c is calls[0] for c in calls) and calls[0].path_attn is not None
    logits.sum().backward()
    assert blk.attn.mat_qkv.weight.grad is not None
    assert m.trunk.pre_blocks[0].ffn.fc1.weight.grad is not None  # through the injection u


def test_training_forward_is_reproducible_from_the_generator() -> None:
    cfg = preset("viar_tiny", drop_path_rate=0.3)
    m = build_model(cfg, generator=torch.Generator().manual_seed(0)).train()
    labels, feats = torch.tensor([0, 1, 2]), torch.randn(3, cfg.seq_len - 1, cfg.z_channels)
    a, sa = m(labels, feats, generator=torch.Generator().manual_seed(5))
    b, sb = m(labels, feats, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and (sa.no_grad_steps, sa.grad_steps) == (sb.no_grad_steps, sb.grad_steps)


def test_label_dropout_only_in_training() -> None:
    cfg = preset("var_tiny", cond_drop_prob=0.999)
    m = build_model(cfg, generator=torch.Generator().manual_seed(0))
    labels, feats = torch.tensor([0, 1]), torch.randn(2, cfg.seq_len - 1, cfg.z_channels)
    null = torch.full_like(labels, cfg.num_classes)
    m.eval()
    with torch.no_grad():
        ev, _ = m(labels, feats)
        ev_null, _ = m(null, feats)
        m.train()
        tr, _ = m(labels, feats, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ev, ev_null)
    torch.testing.assert_close(tr, ev_null)  # every label dropped (p = 0.999, fixed seed)


def test_weight_norm_option_starts_equal_to_plain_init() -> None:
    plain = preset("viar_tiny")
    wn = plain.with_(implicit=ImplicitSpec(pre_depth=1, post_depth=1, weight_norm=True))
    a = build_model(plain, generator=torch.Generator().manual_seed(0)).eval()
    b = build_model(wn, generator=torch.Generator().manual_seed(0)).eval()
    assert any("parametrizations" in k for k in b.state_dict())
    labels, feats = torch.tensor([0, 1]), torch.randn(2, plain.seq_len - 1, plain.z_channels)
    with torch.no_grad():
        torch.testing.assert_close(b(labels, feats)[0], a(labels, feats)[0], rtol=1e-5, atol=1e-5)


def test_jfb_gradient_trains_the_implicit_block() -> None:
    m = build_model(
        "viar_tiny",
        gradient=JFB(),
        train_solver=Picard(tol=None, max_iter=4),
        generator=torch.Generator().manual_seed(0),
    ).train()
    cfg = m.cfg
    labels, feats = torch.tensor([0, 1]), torch.randn(2, cfg.seq_len - 1, cfg.z_channels)
    logits, stats = m(labels, feats, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, cfg.vocab_size, (2 * cfg.seq_len,))).backward()
    assert stats.grad_steps == 1
    assert m.trunk.map.projection.net[0].weight.grad.abs().sum() > 0


def test_bad_inputs_name_the_shape() -> None:
    m = build_model("var_tiny")
    with pytest.raises(ValueError, match=r"feats_BlCv must be \(B, 29, 8\)"):
        m(torch.tensor([0]), torch.randn(1, 28, 8))
    with pytest.raises(ValueError, match="labels must lie"):
        m(torch.tensor([11]), torch.randn(1, 29, 8))
    with pytest.raises(ValueError, match="no room for the implicit block"):
        TransformerConfig(depth=2, implicit=ImplicitSpec(pre_depth=2, post_depth=1))
