"""The CLIP encoder: BLIP3-o's 64-token feature target, input handling, checkpoints, EVA path."""

import json
import math
from pathlib import Path

import pytest
import torch

from blip3o_mini.clip_models import TINY_EVA_MODEL
from blip3o_mini.vision import ClipConfig, ClipEncoder, pool_to_grid


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)


def test_toy_model_is_an_open_clip_config(encoder):
    import open_clip

    assert "blip3o-mini-tiny-clip" in open_clip.list_models()
    vision = encoder.model_cfg["vision_cfg"]
    assert (vision["image_size"], vision["patch_size"], vision["width"]) == (64, 8, 128)
    assert encoder.feature_dim == 128 and encoder.num_tokens == 64


def test_encode_tokens_shape_and_matches_last_block(encoder, images):
    with torch.no_grad():
        tokens = encoder.encode_tokens(images)
        # the same tokens by hand: run every resblock, drop the class token, no final norm
        x = encoder.model.visual._embeds(encoder.preprocess(images))
        for block in encoder.model.visual.transformer.resblocks:
            x = block(x)
    assert tokens.shape == (3, 64, 128)
    torch.testing.assert_close(tokens, x[:, 1:], rtol=1e-5, atol=1e-5)


def test_float_and_uint8_inputs_agree(encoder, images):
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_tokens(images), encoder.encode_tokens(images.float() / 255))


def test_deterministic(encoder, images):
    with torch.no_grad():
        assert torch.equal(encoder.encode_tokens(images), encoder.encode_tokens(images))
    torch.manual_seed(1)
    a = ClipEncoder()
    torch.manual_seed(1)
    b = ClipEncoder()
    assert a.weights_hash() == b.weights_hash()


def test_pooling_arithmetic_on_a_known_grid():
    grid = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3, 4..7, 8..11, 12..15
    pooled = pool_to_grid(grid, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of each 2x2 block
    assert pool_to_grid(grid, 4) is grid  # a grid already at size is left as is
    with pytest.raises(ValueError, match="not a multiple of pool_grid"):
        pool_to_grid(torch.zeros(1, 1, 6, 6), 4)


def test_wrong_size_is_resized_and_grey_is_repeated(encoder, images):
    big = torch.nn.functional.interpolate(images.float(), size=(128, 128), mode="nearest").to(torch.uint8)
    grey = images[:, :1]
    with torch.no_grad():
        assert encoder.encode_tokens(big).shape == (3, 64, 128)
        torch.testing.assert_close(encoder.encode_tokens(grey), encoder.encode_tokens(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 64, 64, dtype=torch.uint8), "must be a batch"),
    (torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "channels-last"),
    (torch.zeros(2, 4, 64, 64, dtype=torch.uint8), "RGBA"),
    (torch.full((2, 3, 64, 64), 255.0), r"\[0, 1\]"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.int32), "uint8 or float"),
])
def test_bad_inputs_raise_clear_errors(encoder, bad, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode_tokens(bad)


def test_text_tower_offline_tokenizer(encoder):
    ids = encoder.tokenize(["a red circle to the left of a blue square"])
    assert ids.shape == (1, 24) and ids[0, 0] == 49406  # open_clip's SimpleTokenizer, offline
    with torch.no_grad():
        emb = encoder.encode_text(["a red circle", "two blue squares"])
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_save_load_roundtrip(encoder, images, tmp_path):
    encoder.set_feature_stats(torch.full((128,), 0.5), torch.full((128,), 2.0))
    try:
        encoder.save(tmp_path)
        assert (tmp_path / "open_clip_model.safetensors").exists()
        assert json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 128
        loaded = ClipEncoder.load(tmp_path)
        assert loaded.weights_hash() == encoder.weights_hash()
        with torch.no_grad():
            assert torch.equal(loaded.encode_tokens(images), encoder.encode_tokens(images))
        torch.testing.assert_close(loaded.feature_std, torch.full((128,), 2.0))
    finally:
        encoder.set_feature_stats(torch.zeros(128), torch.ones(128))


def test_normalize_switch(images, tmp_path):
    torch.manual_seed(0)
    enc = ClipEncoder(ClipConfig(normalize_features=True))
    enc.set_feature_stats(torch.full((128,), 1.0), torch.full((128,), 4.0))
    with torch.no_grad():
        raw = enc.encode_tokens(images, normalize=False)
        normed = enc.encode_tokens(images)
    torch.testing.assert_close(normed, (raw - 1.0) / 4.0)
    torch.testing.assert_close(enc.denormalize(normed), raw)


def test_load_refuses_pickles(encoder, tmp_path):
    torch.save(encoder.model.state_dict(), tmp_path / "model.bin")
    with pytest.raises(ValueError, match="refusing pickle"):
        ClipEncoder.load(tmp_path)
    with pytest.raises(ValueError, match="refusing pickle"):
        ClipEncoder.load(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="missing"):
        ClipEncoder.load(tmp_path / "empty")


def test_offline_eva_fails_fast_naming_the_weights():
    cfg = ClipConfig(model_name="EVA02-E-14-plus", pretrained="laion2b_s9b_b144k", image_size=448)
    with pytest.raises(FileNotFoundError) as err:
        ClipEncoder(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k" in msg
    assert "huggingface-cli download" in msg


def test_eva_family_32x32_grid_pools_4x4(tmp_path):
    """A random-weight EVA02-E-14-plus look-alike (open_clip's timm tower, tiny width/depth)."""
    torch.manual_seed(0)
    enc = ClipEncoder(ClipConfig(model_name=TINY_EVA_MODEL, image_size=448))
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)  # resized to 448
    with torch.no_grad():
        grid = enc.token_grid(images)
        tokens = enc.encode_tokens(images)
        # by hand from timm's own trunk: all blocks, prefix (class) token dropped, no final norm
        x = enc.model.visual.trunk.forward_intermediates(
            enc.preprocess(images), indices=1, intermediates_only=True, output_fmt="NLC")[-1]
    assert grid.shape == (1, 64, 32, 32)
    assert tokens.shape == (1, 64, 64)
    expected = x.view(1, 32, 32, 64)[0]  # (h, w, D)
    # token 0 of the 8x8 grid = mean of the top-left 4x4 patch tokens
    torch.testing.assert_close(tokens[0, 0], expected[:4, :4].mean((0, 1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens[0, 9], expected[4:8, 4:8].mean((0, 1)), rtol=1e-4, atol=1e-5)
    enc.save(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ClipEncoder.load(tmp_path).encode_tokens(images), tokens)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_smoke_loss_decreases(tmp_path, optimizer):
    """A few contrastive steps with open_clip's ClipLoss lower the loss (and leave a resumable
    ckpt), with AdamW and with Muon for the towers' matrices."""
    from blip3o_mini.data import make_sample
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.training.clip import ClipTrainConfig, train_clip
    from blip3o_mini.training.distributed import TrainerConfig

    import datasets

    rows = [make_sample(0, "train", i) for i in range(32)]
    split = datasets.Dataset.from_dict({"image": [r["image"] for r in rows]},
                                       features=datasets.Features({"image": datasets.Image()}))
    torch.manual_seed(0)
    enc = ClipEncoder()
    cfg = ClipTrainConfig(batch_size=32, max_steps=8, lr=2e-3, warmup_steps=1, log_every=1,
                          precision="32-true", checkpoint_every=4, optimizer=optimizer)
    result = train_clip(enc, images_uint8(split), [r["captions"][:1] for r in rows], cfg, tmp_path,
                        trainer=TrainerConfig(accelerator="cpu", precision="32-true"))
    losses = [loss for _, loss in result.loss_history]
    assert result.steps == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.05, losses  # seeded and fp32: deterministic
    assert (tmp_path / "last.ckpt").exists()
    assert not enc.training  # handed back in eval mode


def test_training_in_bf16_with_the_fused_adamw(tmp_path):
    """The CLIP recipe's fused AdamW under Lightning's bf16 autocast (the stage's precision):
    it trains, as the recipes that clip gradients could not (Lightning refuses to clip there)."""
    from blip3o_mini.data import make_sample
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.training.clip import ClipModule, ClipTrainConfig, train_clip
    from blip3o_mini.training.distributed import TrainerConfig

    import datasets

    rows = [make_sample(0, "train", i) for i in range(8)]
    split = datasets.Dataset.from_dict({"image": [r["image"] for r in rows]},
                                       features=datasets.Features({"image": datasets.Image()}))
    enc = ClipEncoder()
    cfg = ClipTrainConfig(batch_size=8, max_steps=2, warmup_steps=1, log_every=1, precision="bf16-mixed")
    assert ClipModule(enc, cfg).configure_optimizers()["optimizer"].param_groups[0]["fused"]
    result = train_clip(enc, images_uint8(split), [r["captions"][:1] for r in rows], cfg, tmp_path,
                        trainer=TrainerConfig(accelerator="cpu", precision="bf16-mixed"))
    assert result.steps == 2 and all(math.isfinite(loss) for _, loss in result.loss_history)


def test_recipe_without_a_trainer_section_trains_fp32_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    """A notebook's short demo calls the recipe with no `trainer:` section: its bf16 must fall back
    to fp32 there as the stages' does (emulated bf16 made 30 demo steps take 217 s, not 16)."""
    from blip3o_mini.data import make_sample
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.training import distributed
    from blip3o_mini.training.clip import ClipTrainConfig, train_clip

    import datasets

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rows = [make_sample(0, "train", i) for i in range(8)]
    split = datasets.Dataset.from_dict({"image": [r["image"] for r in rows]},
                                       features=datasets.Features({"image": datasets.Image()}))
    cfg = ClipTrainConfig(batch_size=8, max_steps=1, warmup_steps=1, log_every=1, precision="bf16-mixed")
    result = train_clip(ClipEncoder(), images_uint8(split), [r["captions"][:1] for r in rows], cfg, tmp_path)
    assert result.trainer.precision == "32-true" and result.steps == 1
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: True)
    assert distributed.stage_trainer_config({}, "bf16-mixed").precision == "bf16-mixed"


def test_muon_takes_both_towers_block_matrices():
    """`optimizer: muon`: the Linear weights of the image and text towers' blocks step with Muon;
    the fused qkv projections, embeddings, norms and the temperature keep the fused AdamW."""
    from blip3o_mini.training.clip import ClipModule, ClipTrainConfig
    from blip3o_mini.training.muon import MuonAdamW, hidden_matrices

    enc = ClipEncoder()
    model = enc.model
    opt = ClipModule(enc, ClipTrainConfig(optimizer="muon")).configure_optimizers()["optimizer"]
    decay, no_decay, muon = opt.param_groups
    assert isinstance(opt, MuonAdamW) and muon["muon"] and decay["fused"] and not decay["muon"]
    matrices = hidden_matrices(model.visual.transformer) + hidden_matrices(model.transformer)
    assert {id(p) for p in muon["params"]} == {id(p) for p in matrices} and muon["weight_decay"] == 0.1
    assert len(matrices) == 3 * (4 + 3)  # attention out, MLP in and out in each of 4 + 3 blocks
    kept = {id(p) for p in decay["params"] + no_decay["params"]}
    assert id(model.token_embedding.weight) in kept and id(model.logit_scale) in kept
    assert all(id(b.attn.in_proj_weight) in kept for b in model.transformer.resblocks)
    with pytest.raises(ValueError, match="clip.train.optimizer must be adamw or muon, got 'lion'"):
        ClipTrainConfig(optimizer="lion")


def test_hard_negative_swaps_one_shape_and_never_a_held_out_pair():
    from blip3o_mini.data.text import parse_caption
    from blip3o_mini.data.world import HELD_OUT
    from blip3o_mini.training.clip import swap_shape

    g = torch.Generator().manual_seed(0)
    for caption in ["a red circle and a blue square", "a photo of two green triangles",
                    "a photo of a circle", "an orange square below a purple circle"]:
        for _ in range(20):
            neg = swap_shape(caption, g)
            before, after = parse_caption(caption), parse_caption(neg)
            assert neg != caption and sum(before.values()) == sum(after.values())
            assert sum((before - after).values()) == sum((after - before).values()) in (1, 2, 3)
            assert not any(key in HELD_OUT for key in after)


def test_contrastive_loss_is_open_clip_clip_loss_plus_negatives():
    from open_clip import ClipLoss

    from blip3o_mini.training.clip import ClipModule, ClipTrainConfig

    module = ClipModule.__new__(ClipModule)
    torch.nn.Module.__init__(module)
    module.loss_fn = ClipLoss()
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(3))
    torch.testing.assert_close(module.contrastive_loss(img, txt, 10.0), ClipLoss()(img, txt, 10.0))
    with_neg = module.contrastive_loss(img, torch.cat([txt, neg]), 10.0)
    # extra negatives can only make the image -> text task harder
    assert with_neg > ClipLoss()(img, txt, 10.0)
    assert ClipTrainConfig().hard_negatives


def test_bench_clip_step_times_the_stage_step(monkeypatch):
    """benchmarks/bench_clip_step.py: the clip stage's step, split into towers, with the share
    of the time in matrix products (what decides whether fewer FLOPs or faster kernels pay)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_clip_step

    from blip3o_mini.training.distributed import recipe_precision_here

    out = bench_clip_step.main(["--batch", "4", "--repeats", "1"])
    assert out["precision"] == recipe_precision_here("bf16-mixed", "cpu")  # as the stage trains on this CPU
    assert out["batch"] == 4 and out["vision_fwd_bwd_s"] > 0 and out["text_fwd_bwd_s"] > 0
    assert 0 < out["matmul_share"] <= 1 and out["matmul_gflop_per_step"] > 0
    loop = bench_clip_step.main(["--batch", "4", "--repeats", "1", "--adamw", "per-tensor"])
    assert out["adamw"] == "recipe" and loop["adamw"] == "per-tensor" and loop["step_s"] > 0
    # --compile wraps both towers' forwards (torch.compile stood in for: compiling costs a minute)
    wrapped = []
    monkeypatch.setattr(torch, "compile", lambda fn: wrapped.append(fn.__name__) or fn)
    compiled = bench_clip_step.main(["--batch", "4", "--repeats", "1", "--compile"])
    assert sorted(wrapped) == ["encode_image", "encode_text"] and compiled["compiled"] and not out["compiled"]
