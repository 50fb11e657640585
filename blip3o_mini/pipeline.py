"""`Blip3oMiniPipeline`: the whole BLIP3-o model behind one object, in the diffusers manner.

    pipe = Blip3oMiniPipeline.from_pretrained("runs/toy/pipeline")
    images = pipe(["a photo of a red circle"], generator=torch.Generator().manual_seed(0)).images
    answers = pipe.answer(images, ["what color is the circle?"])

Text -> frozen backbone + 64 queries -> NextDiT (flow matching, CFG) -> 64 CLIP feature tokens
-> pixel decoder (its own diffusion, CFG) -> image. Understanding goes image -> CLIP tokens ->
backbone -> answer. A directory holds one sub-directory per component, each safetensors +
JSON configs (+ the tokenizer with the backbone), so nothing is unpickled on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_write_json

COMPONENTS = ("clip", "backbone", "generator", "decoder")


@dataclass
class PipelineOutput:
    images: list  # PIL images
    features: torch.Tensor  # (B, 64, F) generated CLIP features


@dataclass
class SamplingConfig:
    """Defaults of `__call__`: BLIP3-o samples the DiT with 30 Euler steps at CFG 3.0."""

    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    decoder_steps: int = 20
    decoder_guidance_scale: float = 1.5
    batch_size: int = 64
    sde_noise: float = 0.0  # noise along the DiT's sampling path (`flow.euler_sample`); 0: the ODE
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # times t (0 = noise) the DiT's CFG applies at

    def __post_init__(self):
        from .flow import check_interval

        self.guidance_interval = check_interval(self.guidance_interval)  # pipeline.json holds a list

    @classmethod
    def from_config(cls, cfg: dict) -> "SamplingConfig":
        """The numbers a run config samples with: the DiT's `generation.flow` (num_steps,
        guidance_scale, guidance_interval, sde_noise) and the decoder's `decoder.eval` (num_inference_steps, guidance_scale);
        keys the config leaves out keep `FlowMatching`'s and `DecoderEvalConfig`'s defaults."""
        from .config import build
        from .decoder_stage import decoder_configs
        from .flow import FlowMatching

        flow = build(FlowMatching, (cfg.get("generation") or {}).get("flow"))
        decoder_eval = decoder_configs(cfg.get("decoder"))[2]
        return cls(flow.num_steps, flow.guidance_scale, decoder_eval.num_inference_steps,
                   decoder_eval.guidance_scale, sde_noise=flow.sde_noise,
                   guidance_interval=flow.guidance_interval)


class Blip3oMiniPipeline:
    def __init__(self, encoder, backbone, generator, decoder, sampling: SamplingConfig | None = None):
        self.encoder, self.backbone, self.generator, self.decoder = encoder, backbone, generator, decoder
        self.sampling = sampling or SamplingConfig()
        for m in (encoder, backbone, generator, decoder):
            m.eval()

    # -- loading and saving -----------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, sampling: SamplingConfig | None = None) -> "Blip3oMiniPipeline":
        """Assemble the pipeline from the stage artifacts of `blip3o-mini run` (the instruct-tuned
        generator when that stage finished, else the generation stage's)."""
        from .decoder import PixelDecoder
        from .features import load_encoder
        from .generation_stage import load_generator, trained_generator_dir
        from .understanding_stage import load_stage_backbone

        run_dir = Path(run_dir)
        encoder = load_encoder(run_dir / "clip")
        backbone = load_stage_backbone(run_dir / "understanding", encoder=encoder)
        return cls(encoder, backbone, load_generator(trained_generator_dir(run_dir)),
                   PixelDecoder.load(run_dir / "decoder"), sampling)

    @classmethod
    def from_config(cls, cfg: dict, sampling: SamplingConfig | None = None) -> "Blip3oMiniPipeline":
        """A pipeline of `cfg`'s sizes with random, untrained weights, built by the same
        constructors the stages train: for timing (benchmarks/bench_sampling.py) and tests.
        Latency does not depend on the weights; the images are meaningless."""
        from .config import build
        from .decoder import PixelDecoder
        from .decoder_stage import decoder_configs
        from .describe import build_backbone, generation_configs, split_section
        from .generation import Blip3oGenerator
        from .vision import ClipConfig, ClipEncoder

        if (cfg.get("understanding") or {}).get("pretrained"):
            raise ValueError("Blip3oMiniPipeline.from_config builds the toy backbone only; for a config "
                             "with understanding.pretrained use from_run on a finished run")
        encoder = ClipEncoder(build(ClipConfig, split_section(cfg.get("clip"))[0]))
        D = encoder.feature_dim
        backbone, _, hidden, _ = build_backbone(cfg, D, device="cpu")
        backbone.encoder = encoder.requires_grad_(False)  # to answer from images, as from_run
        generator = Blip3oGenerator(generation_configs(cfg)[0], D, hidden)
        decoder = PixelDecoder(decoder_configs(cfg.get("decoder"), (1, encoder.num_tokens, D))[0])
        return cls(encoder, backbone.freeze(), generator, decoder,
                   sampling or SamplingConfig.from_config(cfg))

    def to(self, device: str | torch.device) -> "Blip3oMiniPipeline":
        """Move every component to `device` (e.g. "cuda"), as diffusers pipelines do."""
        for m in (self.encoder, self.backbone, self.generator, self.decoder):
            m.to(device)
        return self

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Blip3oMiniPipeline":
        import json

        from .backbone import ToyBackbone
        from .decoder import PixelDecoder
        from .generation_stage import load_generator
        from .vision import ClipEncoder

        d = Path(directory)
        missing = [c for c in COMPONENTS if not (d / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{d} is not a saved Blip3oMiniPipeline: missing {missing}; "
                                    "create one with pipe.save_pretrained(dir) or `blip3o-mini run`")
        encoder = ClipEncoder.load(d / "clip")
        sampling = SamplingConfig(**json.loads((d / "pipeline.json").read_text())["sampling"])
        return cls(encoder, ToyBackbone.load(d / "backbone", encoder=encoder),
                   load_generator(d / "generator"), PixelDecoder.load(d / "decoder"), sampling)

    def save_pretrained(self, directory: str | Path) -> Path:
        from dataclasses import asdict

        from .generation_stage import save_generator

        d = Path(directory)
        self.encoder.save(d / "clip")
        self.backbone.save(d / "backbone")
        save_generator(self.generator, d / "generator")
        self.decoder.save(d / "decoder")
        atomic_write_json(d / "pipeline.json", {"components": list(COMPONENTS),
                                                "sampling": asdict(self.sampling)})
        return d

    # -- generation --------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 decoder_steps: int | None = None, decoder_guidance_scale: float | None = None,
                 sde_noise: float | None = None) -> PipelineOutput:
        """Generate one image per prompt. The same `generator` seed gives the same images."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a list of them), "
                             "e.g. \"a photo of a red circle\"")
        s = self.sampling
        images, feats = [], []
        for i in range(0, len(prompts), s.batch_size):
            chunk = prompts[i:i + s.batch_size]
            f = self.generator.generate_features(
                self.backbone, chunk, num_inference_steps or s.num_inference_steps,
                s.guidance_scale if guidance_scale is None else guidance_scale, generator,
                sde_noise=s.sde_noise if sde_noise is None else sde_noise,
                guidance_interval=s.guidance_interval)  # (b, 64, F)
            images += self.decoder.decode(
                f, decoder_steps or s.decoder_steps,
                s.decoder_guidance_scale if decoder_guidance_scale is None else decoder_guidance_scale,
                generator=generator, output_type="pil")
            feats.append(f)
        return PipelineOutput(images, torch.cat(feats))

    # -- understanding -----------------------------------------------------------------
    def answer(self, images, questions: str | list[str]) -> list[str]:
        """Answer one question per image (PIL images, paths or uint8 tensors)."""
        if isinstance(questions, str):
            questions = [questions]
        return self.backbone.answer(images, questions)
