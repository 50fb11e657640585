"""The pixel decoder: a diffusion model that paints an image from its 64 CLIP feature tokens.

Mirrors the second diffusion stage of BLIP3-o (arXiv 2505.09568, section 3; DESIGN.md section
1): the DiT generates 64 CLIP tokens, and a separate diffusion model trained to *reconstruct*
images from CLIP features turns them into pixels (Emu2's SDXL-based decoder in BLIP3-o, which
BLIP3-o does not train; 50 steps, CFG 3.0). Here it is a small `diffusers`
`UNet2DConditionModel` that reads the tokens through cross-attention, trained on ShapesWorld.

Choices, and why:
- **Pixel space, no VAE.** At 64x64 an image is 12,288 numbers, fewer than SDXL's 128x128x4
  latents; a VAE would be one more model to train and would smear the exact palette colours
  the GenEval-mini detector reads. The only compression is a lossless space-to-depth
  (`pixel_unshuffle` by `space_to_depth`, as a ViT's patchify): 4x4 pixel blocks become 48
  channels at 16x16 and `pixel_shuffle` inverts it exactly. Measured on 2 CPU cores, one
  training step of batch 32 for the same (32, 64, 128) UNet: 8.8 img/s at 64x64, 43 img/s at
  32x32 (2x2 blocks); the toy (64, 128, 128) UNet at 16x16 runs ~90 img/s.
- **Flow matching through diffusers' `FlowMatchEulerDiscreteScheduler`**: the same rectified
  flow path as the DiT (`flow.py`), in diffusers' time: `sigma = 1 - t` (sigma = 1 is noise),
  `x_sigma = (1 - sigma) * x_1 + sigma * x_0`; the scheduler integrates the velocity
  `x_0 - x_1` (noise minus data) with ~20 Euler steps.
- **The UNet predicts the clean image** (`prediction="sample"`, x-prediction as argued for pixel
  space by Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"); the
  scheduler gets the velocity it implies, `(x_sigma - x_1_hat) / sigma`. Images are a
  low-dimensional manifold in pixel space while noise is not: predicting the velocity asks the
  small UNet to reproduce the full-dimensional noise, which it learns far slower within a CPU
  budget (measured: noisy decodes after 300 steps), and x-prediction makes the last Euler step
  land exactly on the network's clean image. `prediction="velocity"` is the SD3 choice.
- **Condition**: the tokens, normalised per dimension by the CLIP stage's statistics,
  projected to `cross_attention_dim`, plus a learned 2-D (row + column) position embedding so
  the UNet knows which 8x8 patch each token describes, enter through cross-attention (as in
  SDXL / Emu2). A UNet's feature map does not know where it is, so a cross-attention query
  cannot ask for "the token of my patch": `coord_channels` give it its (x, y), and
  `spatial_channels` also paste each token's projection onto its grid cell as input channels
  (as cascaded diffusion conditions on a low-resolution image). Measured with 300 training
  steps: cross-attention alone put objects at random places (centre error ~26 px, GenEval-mini
  reconstruction 0.0); with the paste, 1.5 px and 0.45 (measured when the paste
  was added; notebook 04 knocks each pathway out of the trained decoder).
  The null condition for classifier-free guidance zeroes the normalised features (BLIP3-o's
  null is a zero condition too); the position embedding stays.

Shape glossary: B batch, N condition tokens (64 = an 8x8 grid), D CLIP feature width (toy
128), C cross-attention width, H = W image side (64), S space-to-depth factor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .artifacts import atomic_write_json, load_tensors, save_tensors

WEIGHTS_FILE = "decoder.safetensors"
CONFIG_FILE = "config.json"
PREDICTIONS = ("sample", "velocity")


@dataclass
class DecoderConfig:
    """The decoder's architecture; the defaults are the toy CPU model (~4M parameters)."""

    feature_dim: int = 128  # D: width of a CLIP token
    num_tokens: int = 64  # N: CLIP tokens per image, a square grid
    image_size: int = 64  # H = W
    space_to_depth: int = 4  # S: lossless pixel_unshuffle before the UNet (1 = off)
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    num_attention_levels: int = 1  # cross-attention in this many lowest-resolution levels (+ mid)
    cross_attention_dim: int = 128  # C
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    shift: float = 1.0  # diffusers' sigma shift; > 1 spends more steps at high noise
    prediction: str = "sample"  # UNet output: "sample" (clean image x_1) or "velocity" (x_0 - x_1)
    coord_channels: bool = True  # give the UNet its (x, y) so cross-attention can route by place
    spatial_channels: int = 16  # > 0: also paste the tokens, projected, onto their grid cells

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens:
            raise ValueError(f"num_tokens must be a square grid (e.g. 64 = 8x8), got {self.num_tokens}")
        if self.image_size % self.space_to_depth:
            raise ValueError(f"image_size {self.image_size} is not divisible by space_to_depth "
                             f"{self.space_to_depth}")
        if not 0 <= self.num_attention_levels <= len(self.block_out_channels):
            raise ValueError(f"num_attention_levels must be in [0, {len(self.block_out_channels)}], "
                             f"got {self.num_attention_levels}")


class ConditionEmbedder(nn.Module):
    """CLIP tokens (B, N, D) -> cross-attention context (B, N, C): normalise, project, add a
    learned row + column position embedding. `keep[b] = False` gives sample b the null
    condition (zero features)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        side = math.isqrt(cfg.num_tokens)
        C = cfg.cross_attention_dim
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))  # (D,)
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))  # (D,)
        self.proj = nn.Linear(cfg.feature_dim, C)
        self.spatial = nn.Linear(cfg.feature_dim, cfg.spatial_channels) if cfg.spatial_channels else None
        self.side = side
        self.row_embed = nn.Parameter(torch.randn(side, 1, C) * 0.02)  # (8, 1, C)
        self.col_embed = nn.Parameter(torch.randn(1, side, C) * 0.02)  # (1, 8, C)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension statistics of the training features (from the CLIP stage)."""
        self.feature_mean.copy_(mean.reshape(-1))
        self.feature_std.copy_(std.reshape(-1).clamp_min(1e-6))

    def forward(self, features: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """-> (cross-attention context (B, N, C), token grid (B, c, 8, 8) or None)."""
        B, N, D = features.shape
        z = (features - self.feature_mean) / self.feature_std  # (B, N, D)
        if keep is not None:
            z = z * keep.to(z.dtype)[:, None, None]  # (B, N, D) null rows are zeros
        pos = (self.row_embed + self.col_embed).reshape(N, -1)  # (N, C), row-major like the grid
        grid = None
        if self.spatial is not None:
            grid = rearrange(self.spatial(z), "b (h w) c -> b c h w", h=self.side)  # (B, c, 8, 8)
        return self.proj(z) + pos, grid  # (B, N, C)


def build_unet(cfg: DecoderConfig):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    attn = [i >= levels - cfg.num_attention_levels for i in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    channels = 3 * cfg.space_to_depth**2
    extra = 2 * cfg.coord_channels + cfg.spatial_channels
    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.space_to_depth, in_channels=channels + extra, out_channels=channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups)


def images_to_model(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W) in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def model_to_images(x: Tensor) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PixelDecoder(nn.Module):
    """UNet + condition embedder + flow-matching scheduler; `decode` turns CLIP tokens into images."""

    def __init__(self, cfg: DecoderConfig | None = None):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.cfg = cfg or DecoderConfig()
        self.cond_embed = ConditionEmbedder(self.cfg)
        self.unet = build_unet(self.cfg)
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.cfg.num_train_timesteps, shift=self.cfg.shift)

    def check_features(self, features: Tensor) -> None:
        N, D = self.cfg.num_tokens, self.cfg.feature_dim
        if not torch.is_tensor(features) or features.ndim != 3 or tuple(features.shape[1:]) != (N, D):
            got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"features must be CLIP tokens shaped (B, {N}, {D}), got {got}; "
                             "encode images with ClipEncoder.encode_tokens")

    def forward(self, x_t: Tensor, timesteps: Tensor, features: Tensor, keep: Tensor | None = None) -> Tensor:
        """The UNet's prediction (clean image x_1, or the velocity x_0 - x_1: `cfg.prediction`)
        at noisy images x_t (B, 3, H, W), diffusers timesteps (B,) = 1000 * sigma, CLIP tokens
        (B, N, D); `keep` (B,) bool marks conditioned rows (False = null condition)."""
        B, _, H, W = x_t.shape
        S = self.cfg.space_to_depth
        cond, grid = self.cond_embed(features, keep)  # (B, N, C), (B, c, 8, 8) | None
        z = F.pixel_unshuffle(x_t, S)  # (B, 3*S*S, h, w) with h = H/S
        h, w = z.shape[-2:]
        extra = []
        if self.cfg.coord_channels:
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=z.device),
                                    torch.linspace(-1, 1, w, device=z.device), indexing="ij")
            extra.append(torch.stack([xs, ys]).to(z.dtype).expand(B, 2, h, w))  # (B, 2, h, w)
        if grid is not None:
            extra.append(F.interpolate(grid.to(z.dtype), size=(h, w), mode="nearest"))  # (B, c, h, w)
        z = torch.cat([z, *extra], dim=1)  # (B, 3*S*S + extra, h, w)
        out = self.unet(z, timesteps, encoder_hidden_states=cond).sample  # (B, 3*S*S, h, w)
        return F.pixel_shuffle(out, S)  # (B, 3, H, W)

    def guided(self, x_t: Tensor, timesteps: Tensor, features: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance in one batch of 2B: null + scale * (cond - null)."""
        B = x_t.shape[0]
        keep = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)])
        both = self(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                    torch.cat([features, features]), keep.to(x_t.device))  # (2B, 3, H, W)
        v_cond, v_null = both.chunk(2)  # (B, 3, H, W) each
        return v_null + guidance_scale * (v_cond - v_null)

    def velocity(self, x_t: Tensor, sigma: Tensor, features: Tensor, guidance_scale: float = 1.0) -> Tensor:
        """What the scheduler integrates, `x_0 - x_1`, at noise level sigma (B,) in (0, 1].
        CFG acts on the prediction; both parameterisations are affine in it, so guiding the
        clean image or the velocity is the same. Scale 1 is the conditional model (no null pass)."""
        timesteps = sigma * self.scheduler.config.num_train_timesteps  # (B,)
        if guidance_scale == 1.0:
            pred = self(x_t, timesteps, features)  # (B, 3, H, W)
        else:
            pred = self.guided(x_t, timesteps, features, guidance_scale)  # (B, 3, H, W)
        if self.cfg.prediction == "velocity":
            return pred
        return (x_t - pred) / sigma[:, None, None, None]  # (B, 3, H, W) = x_0_hat - x_1_hat

    @torch.no_grad()
    def decode(self, features: Tensor, num_inference_steps: int = 20, guidance_scale: float = 1.5,
               generator: torch.Generator | None = None, output_type: str = "uint8",
               noise: Tensor | None = None):
        """CLIP tokens (B, N, D) -> images: uint8 (B, 3, H, W) or, with output_type="pil", a
        list of PIL images. Noise comes from `generator` (CPU) unless given as `noise`."""
        self.check_features(features)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
        if output_type not in ("uint8", "pil"):
            raise ValueError(f"output_type must be 'uint8' or 'pil', got {output_type!r}")
        B = features.shape[0]
        device = next(self.parameters()).device
        shape = (B, 3, self.cfg.image_size, self.cfg.image_size)
        if noise is None:
            noise = torch.randn(shape, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be shaped {shape}, got {tuple(noise.shape)}")
        sched = type(self.scheduler).from_config(self.scheduler.config)  # fresh step counter
        sched.set_timesteps(num_inference_steps, device=device)
        features = features.to(device=device, dtype=torch.float32)
        x = noise.to(device)  # (B, 3, H, W) at sigma = 1
        for t, sigma in zip(sched.timesteps, sched.sigmas):
            v = self.velocity(x, sigma.expand(B).to(device), features, guidance_scale)  # (B, 3, H, W)
            x = sched.step(v, t, x).prev_sample  # (B, 3, H, W) one Euler step toward sigma = 0
        images = model_to_images(x).cpu()
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        return images

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, **extra) -> None:
        """Weights (safetensors) + `config.json` {"model": DecoderConfig, **extra}, atomically."""
        directory = Path(directory)
        save_tensors(directory / WEIGHTS_FILE, self.state_dict())
        atomic_write_json(directory / CONFIG_FILE, {"model": asdict(self.cfg), **extra})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "PixelDecoder":
        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: no decoder config; train the decoder stage first "
                                    "(blip3o-mini run) or pass the stage directory RUN_DIR/decoder")
        model = cls(DecoderConfig(**json.loads(cfg_path.read_text())["model"]))
        model.load_state_dict(load_tensors(directory / WEIGHTS_FILE))
        return model.to(device).eval()
