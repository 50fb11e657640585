"""NextDiT: shapes, adaLN-Zero identity, 2D RoPE relative positions, condition masking, the
full-size parameter count (meta device), gradient checkpointing, and a one-batch overfit with
the flow-matching loss."""

import pytest
import torch

from blip3o_mini.dit import (FULL_DIT, DiTConfig, NextDiT, apply_rope, grid_positions,
                             rope_angles, timestep_embedding)
from blip3o_mini.flow import FlowMatching

TINY = DiTConfig(in_dim=8, cond_dim=12, dim=32, depth=2, num_heads=2, grid=8, multiple_of=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: their ops are overhead-bound, and on a shared CPU a second thread
    only adds contention (measured 30x slower steps), so this file runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def inputs(cfg=TINY, B=3, Nq=5, seed=0):
    g = gen(seed)
    return (torch.randn(B, cfg.grid ** 2, cfg.in_dim, generator=g), torch.rand(B, generator=g),
            torch.randn(B, Nq, cfg.cond_dim, generator=g))


def perturbed(cfg=TINY, seed=0):
    """A model whose zero-initialised gates/modulations are moved off zero (a 'trained' model)."""
    torch.manual_seed(seed)
    model = NextDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_toy_defaults_shapes():
    cfg = DiTConfig()
    assert (cfg.in_dim, cfg.cond_dim, cfg.grid) == (128, 256, 8)
    model = NextDiT(cfg)
    x_t, t, cond = inputs(cfg, B=2, Nq=64)
    assert model(x_t, t, cond).shape == (2, 64, 128)
    assert 2e6 < model.num_params() < 2e7  # a few million: trains on a CPU


def test_fresh_model_is_identity_blocks_and_zero_output():
    model = NextDiT(TINY)
    x_t, t, cond = inputs()
    assert torch.equal(model(x_t, t, cond), torch.zeros_like(x_t))  # fresh final layer: v = 0
    x = torch.randn(3, 64, TINY.dim)
    c = torch.randn(3, TINY.cond_embed_dim)
    angles = rope_angles(grid_positions(8), TINY.head_dim)
    for block in model.blocks:
        assert torch.equal(block(x, c, torch.randn(3, 5, TINY.dim), None, angles), x)
    # ... but the final layer gets a gradient, so training can start
    loss = FlowMatching().loss(model, x_t, cond).loss
    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_output_depends_on_condition_and_time_but_not_on_masked_tokens():
    model = perturbed().eval()
    x_t, t, cond = inputs()
    v = model(x_t, t, cond)
    assert not torch.allclose(v, model(x_t, t, cond + 1.0), atol=1e-4)
    assert not torch.allclose(v, model(x_t, t * 0.5, cond), atol=1e-4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    changed = cond.clone()
    changed[:, 3:] = 100.0  # only masked-out tokens change
    assert torch.allclose(model(x_t, t, cond, mask), model(x_t, t, changed, mask), atol=1e-5)
    # the null condition (zeros) is a valid input
    assert torch.isfinite(model(x_t, t, torch.zeros_like(cond))).all()


def test_bf16_autocast_close_to_fp32():
    model = perturbed().eval()
    x_t, t, cond = inputs()
    v = model(x_t, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_bf16 = model(x_t, t, cond)
    assert v_bf16.dtype == torch.bfloat16
    assert (v_bf16.float() - v).abs().max() < 0.05 * v.abs().max()


def test_rope_depends_only_on_relative_2d_position():
    head_dim = 16
    g = gen(1)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(pq, pk):
        a = rope_angles(torch.tensor([pq, pk], dtype=torch.float32), head_dim)  # (2, Dh/2)
        return (apply_rope(q, a[:1]) * apply_rope(k, a[1:])).sum().item()

    base = score((1, 2), (4, 7))
    for shift in [(3, 0), (0, -2), (5, 5), (-1, 3)]:
        moved = score((1 + shift[0], 2 + shift[1]), (4 + shift[0], 7 + shift[1]))
        assert moved == pytest.approx(base, abs=1e-5)
    assert score((1, 2), (4, 6)) != pytest.approx(base, abs=1e-3)  # the column offset matters
    assert score((0, 2), (4, 7)) != pytest.approx(base, abs=1e-3)  # and so does the row offset
    # rotations keep the norm; rows turn the first half of the pairs, columns the second
    a = rope_angles(grid_positions(8), head_dim)
    assert a.shape == (64, head_dim // 2)
    assert torch.all(a[1, : head_dim // 4] == 0) and torch.all(a[8, head_dim // 4:] == 0)
    x = torch.randn(2, 3, 64, head_dim, generator=g)
    assert torch.allclose(apply_rope(x, a).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # each pair times e^(i * angle), as Lumina writes it with complex numbers
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (2, 3, 64, Dh/2)
    lumina = torch.view_as_real(pairs * torch.polar(torch.ones_like(a), a)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, a), lumina)


def test_rope_and_time_embedding_match_diffusers_lumina():
    """Same frequencies as diffusers' Lumina helpers; our pairs are (rows..., columns...) where
    Lumina interleaves (row, column, row, ...): a fixed permutation of channel pairs."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina, get_timestep_embedding

    head_dim = 16
    theirs = get_2d_rotary_pos_embed_lumina(head_dim, 8, 8).flatten(0, 1)  # (64, Dh/2) complex
    ours = rope_angles(grid_positions(8), head_dim)  # (64, Dh/2)
    reordered = torch.stack([ours[:, : head_dim // 4], ours[:, head_dim // 4:]], dim=-1).flatten(1)
    assert torch.allclose(torch.polar(torch.ones_like(reordered), reordered), theirs, atol=1e-5)
    t = torch.tensor([0.0, 0.3, 1.0]) * 1000
    assert torch.allclose(timestep_embedding(t, 256),
                          get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
                          atol=1e-5)


def test_full_size_parameter_count_on_meta_device():
    with torch.device("meta"):
        full = NextDiT(DiTConfig(**FULL_DIT))
    assert full.cfg.head_dim == 64
    assert 1.3e9 < full.num_params() < 1.45e9  # BLIP3-o: ~1.4B
    with torch.device("meta"):
        blip3o_ffn = NextDiT(DiTConfig(**FULL_DIT, ffn_mult=4.0))  # the official code's FFN width
    assert 1.6e9 < blip3o_ffn.num_params() < 1.7e9


def test_gradient_checkpointing_gives_same_gradients():
    x_t, t, cond = inputs()
    grads = []
    for flag in (False, True):
        model = perturbed(seed=3)
        model.cfg.gradient_checkpointing = flag
        model.train()
        model(x_t, t, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert sum(g.abs().sum() for g in grads[0].values()) > 0


def test_bad_inputs_raise_clear_errors():
    model = NextDiT(TINY)
    x_t, t, cond = inputs()
    with pytest.raises(ValueError, match="x_t has shape"):
        model(x_t[:, :10], t, cond)
    with pytest.raises(ValueError, match="cond has shape"):
        model(x_t, t, cond[..., :4])
    with pytest.raises(ValueError, match="t has shape"):
        model(x_t, t[:1], cond)
    with pytest.raises(ValueError, match="every condition token"):
        model(x_t, t, cond, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(dim=40, num_heads=4)


def test_overfits_one_batch_with_flow_loss():
    torch.manual_seed(0)
    cfg = TINY
    model = NextDiT(cfg)
    fm = FlowMatching(cond_drop_prob=0.0)
    g = gen(5)
    x_1 = torch.randn(4, 64, cfg.in_dim, generator=g)
    cond = torch.randn(4, 5, cfg.cond_dim, generator=g)
    x_0, t = torch.randn(x_1.shape, generator=g), torch.rand(4, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = fm.loss(model, x_1, cond, x_0=x_0, t=t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2.0, rel=0.2)  # |x_1 - x_0|^2 per element for v_pred = 0
    assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])


def test_patch_size_two_folds_2x2_blocks_of_the_grid():
    cfg = DiTConfig(in_dim=8, cond_dim=12, dim=32, depth=2, num_heads=2, grid=8, multiple_of=16, patch_size=2)
    model = perturbed(cfg)
    assert cfg.token_grid == 4 and model.positions.shape == (16, 2)
    # token (row, col) of the 8x8 grid carries the feature 10 * row + col
    rows, cols = grid_positions(8).unbind(-1)  # (64,) each, raster order
    x = (10 * rows + cols)[None, :, None].expand(1, 64, cfg.in_dim)  # (1, 64, F)
    patches = model.patchify(x)  # (1, 16, 4 F)
    assert patches.shape == (1, 16, 4 * cfg.in_dim)
    # DiT token 5 is block (1, 1): grid tokens (2, 2), (2, 3), (3, 2), (3, 3), row by row
    assert patches[0, 5, ::cfg.in_dim].tolist() == [22, 23, 32, 33]
    assert torch.equal(model.unpatchify(patches), x)
    x_t, t, cond = inputs(cfg)
    assert model(x_t, t, cond).shape == x_t.shape
    assert torch.equal(NextDiT(cfg)(x_t, t, cond), torch.zeros_like(x_t))  # fresh: v = 0


def test_patch_size_must_divide_the_grid():
    with pytest.raises(ValueError, match="patch_size 3 must divide the grid 8"):
        DiTConfig(grid=8, patch_size=3)
    with pytest.raises(ValueError, match="patch_size 0"):
        DiTConfig(grid=8, patch_size=0)


def test_sincos_pos_embed_adds_the_row_and_column_tables_to_each_token():
    from blip3o_mini.dit import sincos_grid

    cfg = DiTConfig(in_dim=8, cond_dim=12, dim=32, depth=2, num_heads=2, grid=8, multiple_of=16, pos_embed="sincos")
    model = perturbed(cfg)
    row, col = sincos_grid(8, 32)  # (8, 32) each: rows fill the first half of the width, columns the second
    assert model.pos_table.shape == (64, 32)
    assert torch.equal(model.pos_table[8 * 2 + 5], row[2] + col[5])  # token (2, 5) in raster order
    assert NextDiT(TINY).pos_table.numel() == 0  # the default, Lumina-Next's: 2D RoPE only
    # the same weights with and without the table: a state dict serves both, the outputs differ
    plain = NextDiT(TINY)
    plain.load_state_dict(model.state_dict())
    x_t, t, cond = inputs(cfg)
    assert not torch.allclose(model(x_t, t, cond), plain(x_t, t, cond))
    assert torch.equal(NextDiT(cfg)(x_t, t, cond), torch.zeros_like(x_t))  # fresh: still v = 0
    with pytest.raises(ValueError, match="pos_embed must be 'none' or 'sincos', got 'learned'"):
        DiTConfig(pos_embed="learned")
