"""The generation head of BLIP3-o: learnable query tokens read out of a frozen backbone, and the
NextDiT that turns them into 64 CLIP feature tokens by flow matching (paper section 3, Fig. 3).

    prompt -> chat template -> [IMG] -> 64 learnable queries -> frozen LLM -> Q (B, Nq, K)
    Q -> NextDiT (flow matching, CFG) -> CLIP features (B, 64, F) -> pixel decoder -> image

Only the queries and the DiT have gradients; the backbone's weights never change (stage 2 of
BLIP3-o's sequential training), so image understanding is exactly preserved.

Features may be standardised before diffusion (`feature_norm: standardize`, using the per-dim
mean/std recorded with the CLIP checkpoint) or used raw as BLIP3-o does (`none`); the
generator maps back to the encoder's scale in `generate_features`.

Shape glossary: B batch, Nq query tokens, K backbone hidden size, N = 64 CLIP tokens,
F CLIP feature width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from .dit import DiTConfig, NextDiT
from .flow import FlowLoss, FlowMatching

FEATURE_NORMS = ("none", "standardize")


class QueryBackbone(Protocol):
    """What stage 2 needs from an understanding backbone (toy LM or Qwen2.5-VL)."""

    hidden_size: int

    def query_states(self, prompts: list[str], query_embeds: Tensor) -> Tensor:
        """Last-layer states at the query positions after `prompt [IMG] q_1..q_Nq`: (B, Nq, K)."""
        ...


@dataclass
class GeneratorConfig:
    num_query_tokens: int = 64
    num_tokens: int = 64  # N: CLIP tokens generated per image (8x8)
    feature_norm: str = "standardize"
    dit: dict = field(default_factory=dict)  # DiTConfig overrides; in_dim/cond_dim filled in
    flow: dict = field(default_factory=dict)  # FlowMatching overrides (drop prob, steps, CFG)

    def __post_init__(self):
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {self.feature_norm!r}; choose one of {FEATURE_NORMS}")


class Blip3oGenerator(nn.Module):
    """Queries + NextDiT + the feature scaling; the backbone is passed in, never owned."""

    def __init__(self, cfg: GeneratorConfig, feature_dim: int, cond_dim: int,
                 feature_mean: Tensor | None = None, feature_std: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.dit_cfg = DiTConfig(**{**cfg.dit, "in_dim": feature_dim, "cond_dim": cond_dim})
        self.flow = FlowMatching(**cfg.flow)
        # BLIP3-o initialises the queries like token embeddings: small random vectors.
        self.queries = nn.Parameter(torch.randn(cfg.num_query_tokens, cond_dim) * 0.02)  # (Nq, K)
        self.dit = NextDiT(self.dit_cfg)
        mean = torch.zeros(feature_dim) if feature_mean is None else feature_mean.float()
        std = torch.ones(feature_dim) if feature_std is None else feature_std.float()
        self.register_buffer("feature_mean", mean.clone())  # (F,)
        self.register_buffer("feature_std", std.clone())  # (F,)

    @property
    def feature_dim(self) -> int:
        return self.dit_cfg.in_dim

    def config_dict(self) -> dict:
        return {"generator": asdict(self.cfg), "feature_dim": self.dit_cfg.in_dim,
                "cond_dim": self.dit_cfg.cond_dim}

    # -- feature scale ---------------------------------------------------------------
    def normalize(self, features: Tensor) -> Tensor:
        if self.cfg.feature_norm == "none":
            return features
        return (features - self.feature_mean) / self.feature_std  # (B, N, F)

    def denormalize(self, x: Tensor) -> Tensor:
        if self.cfg.feature_norm == "none":
            return x
        return x * self.feature_std + self.feature_mean  # (B, N, F)

    # -- the condition ---------------------------------------------------------------
    def condition(self, backbone: QueryBackbone, prompts: list[str]) -> Tensor:
        """Q: the frozen backbone's last-layer states at the query positions, (B, Nq, K)."""
        return backbone.query_states(prompts, self.queries)

    def loss(self, backbone: QueryBackbone, prompts: list[str], features: Tensor,
             generator: torch.Generator | None = None) -> FlowLoss:
        """Flow-matching loss for CLIP `features` (B, N, F) of images described by `prompts`."""
        if features.shape[1:] != (self.cfg.num_tokens, self.feature_dim):
            raise ValueError(f"features must be (B, {self.cfg.num_tokens}, {self.feature_dim}), "
                             f"got {tuple(features.shape)}")
        cond = self.condition(backbone, prompts)  # (B, Nq, K)
        return self.flow.loss(self.dit, self.normalize(features), cond, generator=generator)

    @torch.no_grad()
    def generate_features(self, backbone: QueryBackbone, prompts: list[str],
                          num_inference_steps: int | None = None, guidance_scale: float | None = None,
                          generator: torch.Generator | None = None,
                          return_trajectory: bool = False):
        """Sample CLIP features (B, N, F) for `prompts` with Euler steps and CFG."""
        cond = self.condition(backbone, prompts)  # (B, Nq, K)
        # Noise is drawn on the generator's device (CPU by default), then moved: a seeded CPU
        # generator gives the same images on any device.
        x_0 = torch.randn((len(prompts), self.cfg.num_tokens, self.feature_dim), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        x_0 = x_0.to(cond.device, cond.dtype)  # (B, N, F)
        result = self.flow.sample(self.dit, cond, x_0.shape[1:], x_0=x_0,
                                  num_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  return_trajectory=return_trajectory)
        features = self.denormalize(result.x_1)  # (B, N, F)
        return (features, result) if return_trajectory else features
