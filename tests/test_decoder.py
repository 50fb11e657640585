"""The pixel decoder (blip3o_mini/decoder.py) and its recipe (training/decoder.py), on a tiny UNet."""

import pytest
import torch

from blip3o_mini.decoder import DecoderConfig, PixelDecoder, images_to_model, model_to_images
from blip3o_mini.training.decoder import DecoderModule, DecoderTrainConfig, decoder_loss, train_decoder

D = 16  # feature width of the tiny test decoder


def tiny_cfg(**kw) -> DecoderConfig:
    base = dict(feature_dim=D, image_size=16, space_to_depth=2, block_out_channels=(8, 16),
                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4, spatial_channels=4)
    return DecoderConfig(**(base | kw))


def tiny_decoder(seed: int = 0, **kw) -> PixelDecoder:
    torch.manual_seed(seed)
    return PixelDecoder(tiny_cfg(**kw)).eval()


def features(B: int, seed: int) -> torch.Tensor:
    return torch.randn(B, 64, D, generator=torch.Generator().manual_seed(seed))  # (B, N, D)


def test_decode_shapes_dtype_and_pil():
    dec = tiny_decoder()
    out = dec.decode(features(3, 0), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    pil = dec.decode(features(2, 0), 2, output_type="pil", generator=torch.Generator().manual_seed(0))
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"


def test_pixel_round_trip_and_space_to_depth_is_lossless():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(model_to_images(images_to_model(images)), images)
    x = images_to_model(images)
    z = torch.nn.functional.pixel_unshuffle(x, 2)  # (2, 12, 8, 8)
    assert torch.equal(torch.nn.functional.pixel_shuffle(z, 2), x)


def test_condition_changes_the_image_for_the_same_noise():
    dec = tiny_decoder()
    a = dec.decode(features(2, 0), 3, generator=torch.Generator().manual_seed(5))
    b = dec.decode(features(2, 1), 3, generator=torch.Generator().manual_seed(5))
    a2 = dec.decode(features(2, 0), 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, a2)  # deterministic for a generator seed
    assert not torch.equal(a, b)  # the features reach the pixels ...
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        va, vb = dec(x_t, t, features(2, 0)), dec(x_t, t, features(2, 1))
    assert (va - vb).abs().mean() > 1e-3 * va.abs().mean()  # ... through the velocity


def test_null_condition_ignores_the_features_and_position_embedding_is_per_token():
    dec = tiny_decoder()
    keep = torch.zeros(2, dtype=torch.bool)
    (c1, g1), (c2, g2) = dec.cond_embed(features(2, 0), keep), dec.cond_embed(features(2, 1), keep)
    assert torch.equal(c1, c2) and torch.equal(g1, g2)  # null rows carry no feature content
    assert g1.shape == (2, 4, 8, 8)  # the token grid pasted onto the image
    assert not torch.allclose(c1[:, 0], c1[:, 1])  # but every token knows its grid cell


def test_cfg_scale_one_equals_conditional_model():
    dec = tiny_decoder()
    x_t, t, f = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 200.0]), features(2, 0)
    with torch.no_grad():
        cond = dec(x_t, t, f)
        guided = dec.guided(x_t, t, f, guidance_scale=1.0)  # the 2B-batch CFG path
        null = dec(x_t, t, f, keep=torch.zeros(2, dtype=torch.bool))
        g3 = dec.guided(x_t, t, f, guidance_scale=3.0)
    torch.testing.assert_close(guided, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g3, null + 3.0 * (cond - null), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(g3, cond, atol=1e-3)


@pytest.mark.parametrize("prediction", ["sample", "velocity"])
def test_sampler_with_an_oracle_network_lands_on_the_image(prediction, monkeypatch):
    """A network that knows the clean image x_1 (or the exact flow) decodes it exactly in any
    number of Euler steps: pins the sigma convention and the sample -> velocity conversion."""
    dec = tiny_decoder(prediction=prediction)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x_1 = images_to_model(images)

    def oracle(x_t, timesteps, feats, keep=None):
        x = x_1.repeat(x_t.shape[0] // 2, 1, 1, 1)  # (B or 2B under CFG, 3, H, W)
        if prediction == "sample":
            return x
        sigma = (timesteps / 1000)[:, None, None, None]
        x_0 = (x_t - (1 - sigma) * x) / sigma
        return x_0 - x

    monkeypatch.setattr(dec, "forward", oracle)
    for steps, scale in [(1, 1.0), (4, 1.0), (4, 3.0)]:
        out = dec.decode(features(2, 0), steps, scale, generator=torch.Generator().manual_seed(0))
        assert (out.int() - images.int()).abs().max() <= 1


def test_training_noise_matches_the_diffusers_scheduler():
    dec = tiny_decoder()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = decoder_loss(dec, images, features(4, 0), generator=torch.Generator().manual_seed(0))
    # recover the noise from the target, re-noise with diffusers' forward process
    x_1 = images_to_model(images)
    expected = dec.scheduler.scale_noise(x_1, out.timesteps, out.x_0)
    torch.testing.assert_close(out.x_t, expected, atol=1e-5, rtol=1e-5)
    assert ((out.sigma > 0) & (out.sigma <= 1)).all()


def test_one_batch_overfit(tmp_path):
    """A tiny decoder memorises two 8x8 images, each from its own features."""
    images = torch.full((8, 3, 8, 8), 255, dtype=torch.uint8)
    images[:4, 0, 2:6, 2:6] = 0  # a cyan square on four
    images[4:, 2, 0:4, 4:8] = 0  # a yellow corner on the others
    feats = torch.cat([features(1, 0).expand(4, -1, -1), features(1, 1).expand(4, -1, -1)])
    cfg = DecoderTrainConfig(batch_size=8, max_steps=150, lr=3e-3, warmup_steps=5, cond_drop_prob=0.0,
                             checkpoint_every=1000, log_every=50)
    model_cfg = tiny_cfg(image_size=8, space_to_depth=1, block_out_channels=(16, 32))
    result = train_decoder(model_cfg, cfg, images, feats, tmp_path / "ckpt")
    losses = [loss for _, loss in result.loss_curve]
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses}"
    out = result.decoder.decode(feats[[0, 4]], 10, generator=torch.Generator().manual_seed(0)).float()
    own = (out - images[[0, 4]].float()).abs().mean()
    swapped = (out - images[[4, 0]].float()).abs().mean()
    assert own < 20 and own < swapped / 3, f"mean abs pixel error {own:.1f} (swapped {swapped:.1f})"
    assert (result.decoder.cond_embed.feature_std != 1).any()  # normalisation stats were set


def test_save_load_round_trip_gives_identical_decodes(tmp_path):
    dec = tiny_decoder()
    dec.cond_embed.set_feature_stats(torch.full((D,), 0.5), torch.full((D,), 2.0))
    dec.save(tmp_path, note="test")
    back = PixelDecoder.load(tmp_path)
    assert back.cfg == dec.cfg
    f = features(2, 3)
    a = dec.decode(f, 3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    b = back.decode(f, 3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_resume_continues_from_the_checkpoint(tmp_path):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    feats = features(8, 0)
    cfg = DecoderTrainConfig(batch_size=4, max_steps=4, checkpoint_every=2, log_every=2, ema_decay=0.9)
    first = train_decoder(tiny_cfg(), cfg, images, feats, tmp_path)
    assert (tmp_path / "last.ckpt").exists() and first.resumed_from_step == 0
    longer = DecoderTrainConfig(batch_size=4, max_steps=6, checkpoint_every=2, log_every=2, ema_decay=0.9)
    again = train_decoder(tiny_cfg(), longer, images, feats, tmp_path)
    assert again.resumed_from_step == 4
    assert [s for s, _ in again.loss_curve] == [2, 4, 6]  # the curve survives the restart


def test_ema_follows_the_weights_and_is_exported():
    module = DecoderModule(tiny_cfg(), DecoderTrainConfig(ema_decay=0.99))
    p, e = next(module.decoder.parameters()), next(module.ema.parameters())
    before = e.clone()
    with torch.no_grad():
        p.add_(1.0)
    module.on_train_batch_end(None, None, 0)  # step 0: warm-up decay min(0.99, 1/10) = 0.1
    torch.testing.assert_close(e, before + 0.9)
    assert module.exported() is module.ema
    assert DecoderModule(tiny_cfg(), DecoderTrainConfig(ema_decay=0.0)).ema is None


def test_bad_inputs_raise_clear_errors(tmp_path):
    dec = tiny_decoder()
    with pytest.raises(ValueError, match=r"\(B, 64, 16\)"):
        dec.decode(torch.randn(2, 49, D), 2)
    with pytest.raises(ValueError, match="CLIP tokens"):
        dec.decode(torch.randn(64, D), 2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dec.decode(features(1, 0), 0)
    with pytest.raises(ValueError, match="guidance_scale"):
        dec.decode(features(1, 0), 2, guidance_scale=-1)
    with pytest.raises(ValueError, match="square grid"):
        tiny_cfg(num_tokens=60)
    with pytest.raises(ValueError, match="time_sampling"):
        DecoderTrainConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match="feature rows"):
        train_decoder(tiny_cfg(), DecoderTrainConfig(), torch.zeros(4, 3, 16, 16, dtype=torch.uint8),
                      features(3, 0), tmp_path)
    with pytest.raises(FileNotFoundError, match="decoder stage"):
        PixelDecoder.load(tmp_path / "missing")


def test_reconstruction_metrics_perfect_and_wrong():
    """evaluate_reconstruction: originals score 1.0 everywhere; shuffled decodes do not."""
    import numpy as np

    from blip3o_mini.data.world import render, sample_scene
    from blip3o_mini.evaluation.reconstruction import evaluate_reconstruction

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, allow_unseen=True) for _ in range(8)]
    images = torch.stack([torch.from_numpy(np.asarray(render(s))).permute(2, 0, 1) for s in scenes])
    perfect = evaluate_reconstruction(images, images, scenes)
    assert perfect.geneval.overall == 1.0 and perfect.geneval_originals.overall == 1.0
    assert all(v == 1.0 for v in perfect.agreement.values()) and perfect.center_error_px < 1.0
    wrong = evaluate_reconstruction(images.roll(1, 0), images, scenes)
    assert wrong.geneval.overall < 0.5 and wrong.psnr < perfect.psnr
    assert wrong.metrics()["reconstruction_geneval_mini"] == wrong.geneval.overall


def test_bench_decoder_step_times_the_stage_step(monkeypatch):
    """benchmarks/bench_decoder_step.py times the recipe's own training step at the toy's sizes."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decoder_step

    from blip3o_mini.training.distributed import recipe_precision_here

    out = bench_decoder_step.main(["--steps", "1", "--warmup", "0", "--threads", "1"])
    assert out["precision"] == recipe_precision_here("bf16-mixed", "cpu")  # as the toy's stage trains on this CPU
    assert out["batch"] == 32 and out["eager_step_s"] > 0
    assert "compiled_step_s" not in out  # only with --compile
