"""Blip3oMiniPipeline: text -> queries -> DiT -> CLIP features -> decoder -> PIL images, and
save_pretrained / from_pretrained giving identical images for the same generator seed."""

import pytest
import torch

from blip3o_mini.backbone import BackboneConfig, ToyBackbone
from blip3o_mini.data import make_sample
from blip3o_mini.decoder import DecoderConfig, PixelDecoder
from blip3o_mini.generation import Blip3oGenerator, GeneratorConfig
from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts
from blip3o_mini.vision import ClipConfig, ClipEncoder

from test_generation import wake_up

ROWS = [make_sample(0, "train", i) for i in range(40)]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    encoder = ClipEncoder(ClipConfig()).eval()  # the toy open_clip model, random weights
    D = encoder.feature_dim
    backbone = ToyBackbone(BackboneConfig(vision_dim=D, hidden_size=64, num_layers=2, num_heads=4,
                                          num_kv_heads=2, intermediate_size=128),
                           build_tokenizer(shapesworld_texts(ROWS)), encoder).freeze()
    generator = Blip3oGenerator(GeneratorConfig(num_query_tokens=8, dit=dict(dim=32, depth=1, num_heads=2,
                                                                              multiple_of=16)), D, 64)
    wake_up(generator.dit)
    decoder = PixelDecoder(DecoderConfig(feature_dim=D, block_out_channels=(8, 16), cross_attention_dim=16,
                                         attention_head_dim=8, norm_num_groups=4))
    return Blip3oMiniPipeline(encoder, backbone, generator, decoder,
                              SamplingConfig(num_inference_steps=3, decoder_steps=2))


def pixels(images):
    return torch.stack([torch.from_numpy(__import__("numpy").asarray(im)) for im in images])


def test_call_gives_pil_images_and_features(pipe):
    out = pipe(["a photo of a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].size == (64, 64) and out.images[0].mode == "RGB"
    assert out.features.shape == (2, 64, pipe.encoder.feature_dim)


def test_same_seed_same_images_other_seed_differs(pipe):
    a = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(1)).images
    b = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(1)).images
    c = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(pixels(a), pixels(b))
    assert not torch.equal(pixels(a), pixels(c))


def test_sde_sampling_is_seeded_and_differs_from_the_ode(pipe):
    prompt, seed = "a photo of a red circle", lambda: torch.Generator().manual_seed(4)
    ode = pipe(prompt, generator=seed()).features
    sde = pipe(prompt, generator=seed(), sde_noise=1.0).features
    assert torch.equal(sde, pipe(prompt, generator=seed(), sde_noise=1.0).features)
    assert not torch.allclose(sde, ode)
    assert torch.equal(ode, pipe(prompt, generator=seed(), sde_noise=0.0).features)


def test_save_load_round_trip_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    again = Blip3oMiniPipeline.from_pretrained(tmp_path / "pipe")
    prompts = ["a photo of a red circle", "a green triangle above a blue square"]
    a = pipe(prompts, generator=torch.Generator().manual_seed(3))
    b = again(prompts, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    assert torch.equal(pixels(a.images), pixels(b.images))
    assert again.answer(a.images, ["what color is the circle?"] * 2) == pipe.answer(
        a.images, ["what color is the circle?"] * 2)


def test_bad_inputs_are_clear(pipe, tmp_path):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe("  ")
    with pytest.raises(FileNotFoundError, match="not a saved Blip3oMiniPipeline"):
        Blip3oMiniPipeline.from_pretrained(tmp_path / "nothing")


def test_from_config_builds_toy_sizes_and_sampling_numbers():
    from blip3o_mini.config import load_config

    cfg = load_config("toy")
    pipe = Blip3oMiniPipeline.from_config(cfg)  # random weights: what benchmarks/bench_sampling.py times
    flow, dec_eval = cfg["generation"]["flow"], cfg["decoder"]["eval"]
    s = pipe.sampling
    assert (s.num_inference_steps, s.guidance_scale, s.decoder_steps, s.decoder_guidance_scale) == (
        flow["num_steps"], flow["guidance_scale"], dec_eval["num_inference_steps"], dec_eval["guidance_scale"])
    assert s.guidance_interval == tuple(flow.get("guidance_interval", (0.0, 1.0)))
    assert pipe.generator.dit_cfg.dim == cfg["generation"]["dit"]["dim"]
    assert pipe.decoder.cfg.block_out_channels == tuple(cfg["decoder"]["block_out_channels"])
    out = pipe(["a photo of a red circle", "two blue squares"], num_inference_steps=2, decoder_steps=2)
    assert [(im.size, im.mode) for im in out.images] == [((64, 64), "RGB")] * 2
    assert out.features.shape == (2, 64, pipe.encoder.feature_dim)
    with pytest.raises(ValueError, match="toy backbone only"):
        Blip3oMiniPipeline.from_config({"understanding": {"pretrained": "Qwen/Qwen2.5-VL-3B-Instruct"}})


def test_bench_sampling_times_the_toy_pipeline(monkeypatch):
    """benchmarks/bench_sampling.py on the toy sizes (whitened: the DiT samples 24 numbers per
    token, the decoder gets 128): every stage timed, images and features as `pipe(...)`'s."""
    import dataclasses
    from pathlib import Path

    from blip3o_mini.config import load_config

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_sampling

    pipe = Blip3oMiniPipeline.from_config(load_config("toy"))
    pipe.sampling = dataclasses.replace(pipe.sampling, num_inference_steps=2, decoder_steps=2)
    times = bench_sampling.measure(pipe, ["a photo of a red circle", "two blue squares"], repeats=1, warmup=0,
                                   cuda=False)
    assert set(times) == set(bench_sampling.STAGES)
    assert all(len(t["wall"]) == 1 and t["wall"][0] > 0 for t in times.values())
