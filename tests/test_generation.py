"""Stage 2: queries through a frozen backbone, the DiT trained by flow matching."""

import dataclasses
import hashlib

import lightning as L
import pytest
import torch
from torch import nn

from blip3o_mini.generation import Blip3oGenerator, GeneratorConfig
from blip3o_mini.training.generation import CaptionFeatureDataset, GenerationModule, GenerationTrainConfig, collate
from tiny_backbone import TinyBackbone  # tests/tiny_backbone.py

F, K = 16, 32


def wake_up(dit):
    """A fresh DiT is the identity with zero output and closed condition gates (adaLN-Zero):
    give its zero-initialised weights small values so gradients reach every input."""
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(std=0.05)


def weights_hash(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def tiny_generator(**kw):
    cfg = GeneratorConfig(num_query_tokens=4, dit=dict(dim=32, depth=2, num_heads=2, multiple_of=16),
                          flow=dict(num_steps=4), **kw)
    return Blip3oGenerator(cfg, feature_dim=F, cond_dim=K)


def test_condition_and_sample_shapes():
    torch.manual_seed(0)
    gen, bb = tiny_generator(), TinyBackbone().eval()
    prompts = ["a red circle", "two blue squares and a green triangle"]
    assert gen.condition(bb, prompts).shape == (2, 4, K)
    many = prompts * 3  # in chunks of 2 through the backbone: the same Q
    torch.testing.assert_close(gen.condition(bb, many, chunk_size=2), gen.condition(bb, many))
    feats = gen.generate_features(bb, prompts, generator=torch.Generator().manual_seed(0))
    assert feats.shape == (2, 64, F)
    again = gen.generate_features(bb, prompts, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(feats, again)


def test_gradients_reach_queries_not_backbone():
    torch.manual_seed(0)
    gen, bb = tiny_generator(), TinyBackbone()
    bb.requires_grad_(False).eval()
    wake_up(gen.dit)
    out = gen.loss(bb, ["a red circle"] * 4, torch.randn(4, 64, F))
    out.loss.backward()
    assert gen.queries.grad is not None and gen.queries.grad.abs().sum() > 0
    assert gen.dit.final.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_bad_feature_shape_is_clear():
    gen, bb = tiny_generator(), TinyBackbone()
    with pytest.raises(ValueError, match=r"features must be \(B, 64, 16\)"):
        gen.loss(bb, ["a red circle"], torch.randn(1, 32, F))


def test_feature_norm_round_trip():
    mean, std = torch.randn(F), torch.rand(F) + 0.5
    gen = Blip3oGenerator(GeneratorConfig(num_query_tokens=4, dit=dict(dim=32, depth=1, num_heads=2)),
                          F, K, feature_mean=mean, feature_std=std)
    x = torch.randn(3, 64, F) * std + mean
    torch.testing.assert_close(gen.denormalize(gen.normalize(x)), x)
    assert gen.normalize(x).std() == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="feature_norm"):
        GeneratorConfig(feature_norm="l2")


def test_whitening_round_trip_and_unit_covariance():
    """`whiten` maps tokens onto principal coordinates of unit variance and back exactly; a
    direction carrying 1/400 of the variance weighs as much as the largest."""
    from blip3o_mini.features import measure_stats, measure_whitening

    torch.manual_seed(0)
    scales = torch.logspace(0, -1.3, F)  # per-direction std 1 .. 0.05
    mixing = torch.linalg.qr(torch.randn(F, F))[0]  # a random rotation: correlated dims
    x = (torch.randn(500, 64, F) * scales) @ mixing.T + 3.0  # (500, 64, F)
    mean, std = measure_stats(x)
    var, basis = measure_whitening(x, mean, std)
    assert (var.diff() <= 0).all() and var.shape == (F,) and basis.shape == (F, F)
    gen = Blip3oGenerator(GeneratorConfig(num_query_tokens=4, feature_norm="whiten",
                                          dit=dict(dim=32, depth=1, num_heads=2)),
                          F, K, feature_mean=mean, feature_std=std, whitening=(var, basis))
    z = gen.normalize(x).reshape(-1, F)  # (N, F)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(F), atol=0.02, rtol=0)
    torch.testing.assert_close(gen.denormalize(gen.normalize(x)), x, atol=1e-4, rtol=1e-4)
    # standardising alone leaves the small directions small
    zs = ((x - mean) / std).reshape(-1, F) @ basis  # (N, F)
    assert zs[:, -1].var() < 0.01 * zs[:, 0].var()
    # the whitening travels with the weights: a fresh generator loads it
    fresh = Blip3oGenerator(gen.cfg, F, K)
    fresh.load_state_dict(gen.state_dict())
    torch.testing.assert_close(fresh.normalize(x), gen.normalize(x))


class LowRankQueries(nn.Module):
    """A stand-in backbone whose Q varies along 4 directions of very different scale on top of a
    large shared offset, as the toy's does: a prompt's words set the coordinates."""

    hidden_size = K

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.offset = torch.randn(4, K, generator=g) * 5  # (Nq, K): every prompt's shared part
        self.directions = torch.linalg.qr(torch.randn(K, 4, generator=g))[0].T * torch.tensor([[3.0], [1.0], [0.3], [0.1]])

    def query_states(self, prompts, query_embeds):
        coords = torch.stack([torch.tensor([float(w) for w in p.split()]) for p in prompts])  # (B, 4)
        return self.offset + (coords @ self.directions)[:, None] + 0 * query_embeds.sum()  # (B, Nq, K)


@pytest.mark.parametrize("norm", ["standardize", "whiten"])
def test_condition_norm_centres_and_scales_q(norm):
    """`cond_norm` removes Q's shared part and scales what varies between prompts: whitened, a
    direction with 1/900 of the largest one's variance reaches the DiT as loud as it; the
    statistics travel with the weights; `none` leaves Q as the backbone returns it."""
    torch.manual_seed(0)
    bb = LowRankQueries()
    prompts = [" ".join(str(v) for v in torch.randn(4).tolist()) for _ in range(500)]
    gen = tiny_generator(cond_norm=norm)
    torch.testing.assert_close(gen.condition(bb, prompts[:3]), bb.query_states(prompts[:3], gen.queries))  # unfitted
    gen.fit_condition_norm(bb, prompts, chunk_size=128)
    q = gen.condition(bb, prompts)  # (500, Nq, K)
    assert q.mean(0).abs().max() < 1e-3  # the shared offset is gone
    coords = q[:, 0] @ torch.linalg.pinv(bb.directions)  # (500, 4): each direction's coordinate
    loudness = coords.std(0) * bb.directions.norm(dim=1)  # what the DiT sees of each direction
    if norm == "whiten":  # unit variance along every direction that varies
        torch.testing.assert_close(loudness / loudness[0], torch.ones(4), rtol=0.1, atol=0)
    else:  # per axis: the directions mix every axis, so the small one stays far quieter
        assert loudness[3] < 0.3 * loudness[0]
    fresh = tiny_generator(cond_norm=norm)
    fresh.load_state_dict(gen.state_dict())
    torch.testing.assert_close(fresh.condition(bb, prompts[:3]), q[:3], atol=1e-4, rtol=1e-4)
    plain = tiny_generator()
    plain.fit_condition_norm(bb, prompts)  # nothing to fit, no buffers added
    assert "cond_mean" not in plain.state_dict()
    torch.testing.assert_close(plain.condition(bb, prompts[:3]), bb.query_states(prompts[:3], plain.queries))
    with pytest.raises(ValueError, match="cond_norm"):
        GeneratorConfig(cond_norm="zca")


def test_condition_prompts_sample_captions_seeded_or_stream_the_first():
    """The prompts whose Q fits `cond_norm`: a seeded sample of a caption dataset's paraphrases
    (the same for every rank and every resume), or the first of a stream."""
    from blip3o_mini.generation_stage import condition_prompts

    captions = [[f"caption {i}", f"paraphrase {i}"] for i in range(50)]
    ds = CaptionFeatureDataset(captions, torch.zeros(50, 64, F))
    a, b = condition_prompts(ds, 30, seed=0), condition_prompts(ds, 30, seed=0)
    assert a == b and len(set(a)) == 30 and set(a) <= {t for c in captions for t in c}
    assert condition_prompts(ds, 30, seed=1) != a
    assert len(condition_prompts(ds, 500)) == 100  # no more than there are

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ((f"caption {i}", torch.zeros(3)) for i in range(10))

    assert condition_prompts(Stream(), 4) == [f"caption {i}" for i in range(4)]


def test_whiten_power_sets_each_directions_variance():
    """`whiten_power` p leaves direction i with variance var_i ** (1 - 2p): 1 at p = 0.5, the
    standardised variance at p = 0 (rotation only), the square root between; always invertible."""
    from blip3o_mini.features import measure_stats, measure_whitening

    torch.manual_seed(2)
    x = torch.randn(400, 64, F) * torch.logspace(0, -1.5, F) + 2.0  # (400, 64, F)
    mean, std = measure_stats(x)
    var, basis = measure_whitening(x, mean, std)
    for power in (0.0, 0.25, 0.5):
        cfg = dataclasses.replace(tiny_generator(feature_norm="whiten").cfg, whiten_power=power)
        gen = Blip3oGenerator(cfg, F, K, mean, std, (var, basis))
        z = gen.normalize(x).reshape(-1, F)  # (N, F)
        torch.testing.assert_close(z.var(0), var ** (1 - 2 * power), rtol=0.03, atol=1e-4)
        torch.testing.assert_close(gen.denormalize(gen.normalize(x)), x, atol=1e-4, rtol=1e-4)
    for bad in ({"whiten_power": 0.7, "feature_norm": "whiten"}, {"whiten_power": 0.25}):
        with pytest.raises(ValueError, match="whiten_power"):
            GeneratorConfig(**bad)


def test_generation_stage_refuses_a_contrastive_weight_it_has_no_negatives_for():
    # the stage's batches carry no negatives: the weight would be silently ignored
    with pytest.raises(ValueError, match="contrastive_weight needs negatives"):
        GeneratorConfig(flow={"contrastive_weight": 0.5})
    assert GeneratorConfig(flow={"contrastive_weight": 0.0}).flow == {"contrastive_weight": 0.0}


def test_whiten_dims_keeps_the_largest_directions():
    """With `whiten_dims` L the DiT generates L numbers per token; decoding them gives the token's
    projection onto its L largest principal directions, at the encoder's full width."""
    from blip3o_mini.features import measure_stats, measure_whitening

    torch.manual_seed(1)
    x = torch.randn(300, 64, F) * torch.logspace(0, -2, F) + 1.0  # (300, 64, F), variance falling per dim
    mean, std = measure_stats(x)
    var, basis = measure_whitening(x, mean, std)
    gen = tiny_generator(feature_norm="whiten", whiten_dims=4)
    gen = Blip3oGenerator(gen.cfg, F, K, mean, std, (var, basis))
    assert gen.dit_cfg.in_dim == 4 and gen.normalize(x).shape == (300, 64, 4)
    top = basis[:, :4]  # (F, 4)
    projected = ((x - mean) / std) @ top @ top.T * std + mean  # (300, 64, F)
    torch.testing.assert_close(gen.denormalize(gen.normalize(x)), projected, atol=1e-4, rtol=1e-4)
    feats = gen.generate_features(TinyBackbone(), ["a red circle", "two squares"],
                                  generator=torch.Generator().manual_seed(0))
    assert feats.shape == (2, 64, F)
    assert gen.loss(TinyBackbone(), ["a red circle"], x[:1]).v_pred.shape == (1, 64, 4)
    with pytest.raises(ValueError, match="whiten_dims=4 needs feature_norm: whiten"):
        GeneratorConfig(whiten_dims=4)
    with pytest.raises(ValueError, match="whiten_dims=20 exceeds the feature width 16"):
        tiny_generator(feature_norm="whiten", whiten_dims=20)


def test_direction_fvu_is_zero_for_a_perfect_guess_and_one_where_nothing_is_generated():
    from blip3o_mini.evaluation.directions import direction_fvu
    from blip3o_mini.features import measure_stats, measure_whitening

    torch.manual_seed(2)
    x = torch.randn(40, 64, F) * torch.logspace(0, -2, F) + 1.0  # (40, 64, F)
    mean, std = measure_stats(x)
    var, basis = measure_whitening(x, mean, std)
    gen = Blip3oGenerator(tiny_generator(feature_norm="whiten", whiten_dims=4).cfg, F, K, mean, std, (var, basis))
    x1 = gen.normalize(x)  # (40, 64, 4)

    class TrueVelocity(nn.Module):
        def forward(self, x_t, t, cond, mask):
            return (x1 - x_t) / (1 - t[:, None, None])  # (40, 64, 4)

    gen.dit = TrueVelocity()
    fvu = direction_fvu(gen, TinyBackbone(), x, ["a red circle"] * 40, mean, std, var, basis,
                        times=(0.2, 0.8), groups=((0, 4), (4, None)))
    for t in (0.2, 0.8):
        assert fvu[t]["0-4"] < 1e-6  # the guess is the data in every generated direction
        assert fvu[t]["4-16"] == pytest.approx(1.0, abs=0.01)  # the mean elsewhere


def test_queries_train_at_their_own_learning_rate():
    """`query_lr_scale` gives the queries (whose change moves every prompt's Q) their own lr;
    the DiT keeps `lr`, and both follow the schedule."""
    gen, bb = tiny_generator(), TinyBackbone()
    cfg = GenerationTrainConfig(lr=4e-3, min_lr=4e-4, warmup_steps=1, max_steps=10, query_lr_scale=0.1)
    opt = GenerationModule(gen, bb, cfg).configure_optimizers()["optimizer"]
    dit_group, query_group = opt.param_groups
    assert query_group["params"] == [gen.queries] and query_group["lr"] == pytest.approx(4e-4)
    assert dit_group["lr"] == pytest.approx(4e-3) and len(dit_group["params"]) == len(list(gen.dit.parameters()))
    frozen = GenerationModule(gen, bb, dataclasses.replace(cfg, query_lr_scale=0.0))
    assert not gen.queries.requires_grad  # scale 0: frozen outright, no group of their own
    assert len(frozen.configure_optimizers()["optimizer"].param_groups) == 1
    loss = frozen.generator.loss(bb, ["a red circle"], torch.randn(1, 64, F))
    assert not gen.condition(bb, ["a red circle"]).requires_grad  # Q builds no graph through the LM
    loss.loss.backward()
    assert gen.queries.grad is None and gen.dit.final.linear.weight.grad is not None
    with pytest.raises(ValueError, match="query_lr_scale must be >= 0"):
        GenerationTrainConfig(query_lr_scale=-0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_overfits_one_batch_and_keeps_backbone_frozen(optimizer):
    torch.manual_seed(0)
    gen, bb = tiny_generator(), TinyBackbone()
    gen.flow.cond_drop_prob = 0.0  # every sample conditioned: the data is a function of the prompt
    before = weights_hash(bb)
    feats = torch.randn(2, 64, F).repeat(4, 1, 1)  # (8, 64, F): one target per prompt
    ds = CaptionFeatureDataset([["a red circle"], ["a blue square"]] * 4, feats)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)
    cfg = GenerationTrainConfig(max_steps=80, lr=1e-2, min_lr=3e-3, warmup_steps=5, log_every=1, optimizer=optimizer)
    module = GenerationModule(gen, bb, cfg)
    trainer = L.Trainer(max_steps=cfg.max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=cfg.grad_clip)
    trainer.fit(module, loader)
    first, last = module.losses[0][1], min(l for _, l in module.losses[-10:])
    assert last < 0.7 * first, (first, last)
    assert weights_hash(bb) == before
    assert not bb.training  # Lightning's train() never put the frozen backbone in train mode


def test_generation_train_seed_follows_the_runs_seed_unless_its_own_is_set():
    """One `seed:` line draws every stage's start and data order; `generation.train.seed` still wins
    (before, the generation stage trained from seed 0 whatever the run's seed)."""
    from blip3o_mini.config import with_run_seed
    from blip3o_mini.describe import generation_configs

    assert generation_configs({"seed": 3, "generation": {}})[1].seed == 3
    assert generation_configs({"seed": 3, "generation": {"train": {"seed": 5}}})[1].seed == 5
    assert generation_configs({"generation": {"train": {"max_steps": 2}}})[1].seed == 0
    train = generation_configs({"generation": {"train": {"seed": 0}}})[1]
    assert with_run_seed(train, {"seed": 7}, {"seed": 0}).seed == 0  # its own seed 0 is a choice, kept
