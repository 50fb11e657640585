"""The generation head of BLIP3-o: learnable query tokens read out of a frozen backbone, and the
NextDiT that turns them into 64 CLIP feature tokens by flow matching (paper section 3, Fig. 3).

    prompt -> chat template -> [IMG] -> 64 learnable queries -> frozen LLM -> Q (B, Nq, K)
    Q -> NextDiT (flow matching, CFG) -> CLIP features (B, 64, F) -> pixel decoder -> image

Only the queries and the DiT have gradients; the backbone's weights never change (stage 2 of
BLIP3-o's sequential training), so image understanding is exactly preserved.

Features may be standardised before diffusion (`feature_norm: standardize`, using the per-dim
mean/std recorded with the CLIP checkpoint), also whitened (`whiten`: rotated onto their
principal directions and each scaled to unit variance), or used raw as BLIP3-o does (`none`); the
generator maps back to the encoder's scale in `generate_features`. Whitening matters when what
an image *is* lives in low-variance directions: the toy CLIP tokens put 96% of their variance in
16 of 128 directions, while the decoder needs the next 8 to paint a square's corners
(docs/status.md); an unweighted MSE on standardised features spends almost nothing there.

The condition Q reaches the DiT raw, as in BLIP3-o, unless `cond_norm` centres it and scales it
per dimension (`standardize`) or whitens it (`whiten`), with statistics of training prompts
measured once before stage 2 trains (`fit_condition_norm`) and saved with the weights.

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

FEATURE_NORMS = ("none", "standardize", "whiten")
COND_NORMS = ("none", "standardize", "whiten")


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
    # With `whiten`: keep only the largest this many principal directions (None: all). The DiT
    # then generates this many numbers per token; the rest of each token is the mean.
    whiten_dims: int | None = None
    # With `whiten`: each principal coordinate is divided by variance ** whiten_power. 0.5: unit
    # variance, every direction weighs the same in the loss; 0: rotated only, the largest
    # directions dominate as with `standardize`; 0.25 between (it scored lower: docs/status.md).
    whiten_power: float = 0.5
    # The condition Q before the DiT's caption projection: raw, as BLIP3-o (`none`), or centred on
    # the mean Q of training prompts and scaled per dimension (`standardize`) or whitened
    # (`whiten`), so a direction that varies little across prompts (where an object stands)
    # reaches the DiT as loud as one that varies much (its colour). Measured once, with the
    # initial queries, at the stage's start (`fit_condition_norm`).
    cond_norm: str = "none"
    # With cond_norm `whiten`: variances below this fraction of the mean variance are raised to
    # it, so directions that are numerical noise are not blown up to unit scale.
    cond_floor: float = 0.01
    dit: dict = field(default_factory=dict)  # DiTConfig overrides; in_dim/cond_dim filled in
    flow: dict = field(default_factory=dict)  # FlowMatching overrides (drop prob, steps, CFG)

    def __post_init__(self):
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {self.feature_norm!r}; choose one of {FEATURE_NORMS}")
        if self.whiten_dims is not None and (self.feature_norm != "whiten" or self.whiten_dims < 1):
            raise ValueError(f"whiten_dims={self.whiten_dims} needs feature_norm: whiten and a value >= 1 "
                             "(or null to keep every direction)")
        if not 0 <= self.whiten_power <= 0.5 or (self.whiten_power != 0.5 and self.feature_norm != "whiten"):
            raise ValueError(f"whiten_power={self.whiten_power} must lie in [0, 0.5] and needs feature_norm: whiten")
        if self.cond_norm not in COND_NORMS:
            raise ValueError(f"unknown cond_norm {self.cond_norm!r}; choose one of {COND_NORMS}")
        if not 0 < self.cond_floor <= 1:
            raise ValueError(f"cond_floor={self.cond_floor} must lie in (0, 1]")
        if self.flow.get("contrastive_weight", 0.0):  # the stage's batches carry no negatives
            raise ValueError("generation.flow.contrastive_weight needs negatives, which the generation stage does "
                             "not build; remove it (scripts/ablate_dit_geneval.py --contrastive trains with them)")


class Blip3oGenerator(nn.Module):
    """Queries + NextDiT + the feature scaling; the backbone is passed in, never owned."""

    def __init__(self, cfg: GeneratorConfig, feature_dim: int, cond_dim: int,
                 feature_mean: Tensor | None = None, feature_std: Tensor | None = None,
                 whitening: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.cfg, self.feature_dim = cfg, feature_dim
        if cfg.whiten_dims is not None and cfg.whiten_dims > feature_dim:
            raise ValueError(f"whiten_dims={cfg.whiten_dims} exceeds the feature width {feature_dim}")
        latent_dim = cfg.whiten_dims or feature_dim  # what the DiT generates per token
        self.dit_cfg = DiTConfig(**{**cfg.dit, "in_dim": latent_dim, "cond_dim": cond_dim})
        self.flow = FlowMatching(**cfg.flow)
        # BLIP3-o initialises the queries like token embeddings: small random vectors.
        self.queries = nn.Parameter(torch.randn(cfg.num_query_tokens, cond_dim) * 0.02)  # (Nq, K)
        self.dit = NextDiT(self.dit_cfg)
        mean = torch.zeros(feature_dim) if feature_mean is None else feature_mean.float()
        std = torch.ones(feature_dim) if feature_std is None else feature_std.float()
        self.register_buffer("feature_mean", mean.clone())  # (F,)
        self.register_buffer("feature_std", std.clone())  # (F,)
        if cfg.feature_norm == "whiten":  # (variances (F,), directions (F, F)) of standardised tokens
            var, basis = whitening if whitening is not None else (torch.ones(feature_dim), torch.eye(feature_dim))
            self.register_buffer("feature_pca_var", var[:latent_dim].float().clone())  # (L,)
            self.register_buffer("feature_pca_basis", basis[:, :latent_dim].float().clone())  # (F, L), one per column
        if cfg.cond_norm != "none":  # Q -> (Q - cond_mean) @ cond_transform; identity until fitted
            self.register_buffer("cond_mean", torch.zeros(cfg.num_query_tokens, cond_dim))  # (Nq, K)
            self.register_buffer("cond_transform", torch.eye(cond_dim))  # (K, K)

    def config_dict(self) -> dict:
        return {"generator": asdict(self.cfg), "feature_dim": self.feature_dim,
                "cond_dim": self.dit_cfg.cond_dim}

    # -- feature scale ---------------------------------------------------------------
    def normalize(self, features: Tensor) -> Tensor:
        if self.cfg.feature_norm == "none":
            return features
        z = (features - self.feature_mean) / self.feature_std  # (B, N, F)
        if self.cfg.feature_norm == "whiten":
            z = z @ self.feature_pca_basis / self.feature_pca_var ** self.cfg.whiten_power  # (B, N, L) principal coordinates
        return z

    def denormalize(self, x: Tensor) -> Tensor:
        if self.cfg.feature_norm == "none":
            return x
        if self.cfg.feature_norm == "whiten":
            x = (x * self.feature_pca_var ** self.cfg.whiten_power) @ self.feature_pca_basis.T  # (B, N, L) -> (B, N, F)
        return x * self.feature_std + self.feature_mean  # (B, N, F)

    # -- the condition ---------------------------------------------------------------
    def condition(self, backbone: QueryBackbone, prompts: list[str], chunk_size: int | None = None,
                  run_lm=None) -> Tensor:
        """Q: the frozen backbone's last-layer states at the query positions, (B, Nq, K).
        With `chunk_size`, the prompts go through the backbone that many at a time (thousands
        of prompts at once would hold the LM's activations for all of them). `run_lm`: the
        backbone's LM in another form (training passes the compiled one)."""
        return self.normalize_condition(self.raw_condition(backbone, prompts, chunk_size, run_lm))  # (B, Nq, K)

    def normalize_condition(self, q: Tensor) -> Tensor:
        """`cond_norm` applied to raw Q (B, Nq, K): (Q - mean) @ transform, or Q itself."""
        if self.cfg.cond_norm == "none":
            return q
        return (q - self.cond_mean.to(q.dtype)) @ self.cond_transform.to(q.dtype)  # (B, Nq, K)

    def raw_condition(self, backbone: QueryBackbone, prompts: list[str], chunk_size: int | None = None,
                      run_lm=None) -> Tensor:
        """Q as the backbone returns it, before `cond_norm`: (B, Nq, K)."""
        extra = {} if run_lm is None else {"run_lm": run_lm}  # a QueryBackbone need not take it
        if chunk_size is None or len(prompts) <= chunk_size:
            return backbone.query_states(prompts, self.queries, **extra)
        return torch.cat([backbone.query_states(prompts[i:i + chunk_size], self.queries, **extra)
                          for i in range(0, len(prompts), chunk_size)])  # (B, Nq, K)

    @torch.no_grad()
    def fit_condition_norm(self, backbone: QueryBackbone, prompts: list[str], chunk_size: int = 256) -> None:
        """Measure `cond_norm`'s statistics on the Q of `prompts` (training captions) with the
        current queries: the mean Q of each query position, and a per-dimension scale
        (`standardize`) or the inverse square root of the covariance (`whiten`, ZCA: it keeps
        the K axes, so the caption projection's width is unchanged)."""
        if self.cfg.cond_norm != "none":
            self.fit_condition_norm_on(self.raw_condition(backbone, prompts, chunk_size))

    @torch.no_grad()
    def fit_condition_norm_on(self, q: Tensor) -> None:
        """`fit_condition_norm` from raw Q (P, Nq, K) already computed (`raw_condition`)."""
        q = q.float()
        mean = q.mean(dim=0)  # (Nq, K): each query position has its own typical state
        z = (q - mean).flatten(0, 1)  # (P * Nq, K)
        var, basis = condition_variances(z, self.cfg.cond_norm)
        var = var.clamp_min(self.cfg.cond_floor * var.mean())  # (K,)
        transform = basis * var.rsqrt() @ basis.T  # (K, K): diag(std)^-1 for standardize, ZCA for whiten
        self.cond_mean.copy_(mean)
        self.cond_transform.copy_(transform)

    def loss(self, backbone: QueryBackbone, prompts: list[str], features: Tensor,
             generator: torch.Generator | None = None, dit=None, run_lm=None) -> FlowLoss:
        """Flow-matching loss for CLIP `features` (B, N, F) of images described by `prompts`.
        `dit`: what computes the velocity, by default `self.dit`; `run_lm`: what runs the
        backbone's LM, by default its own (training passes the compiled forms of both)."""
        if features.shape[1:] != (self.cfg.num_tokens, self.feature_dim):
            raise ValueError(f"features must be (B, {self.cfg.num_tokens}, {self.feature_dim}), "
                             f"got {tuple(features.shape)}")
        cond = self.condition(backbone, prompts, run_lm=run_lm)  # (B, Nq, K)
        return self.flow.loss(self.dit if dit is None else dit, self.normalize(features), cond, generator=generator)

    @torch.no_grad()
    def generate_features(self, backbone: QueryBackbone, prompts: list[str],
                          num_inference_steps: int | None = None, guidance_scale: float | None = None,
                          generator: torch.Generator | None = None,
                          return_trajectory: bool = False, sde_noise: float | None = None,
                          guidance_interval: tuple[float, float] | None = None):
        """Sample CLIP features (B, N, F) for `prompts` with Euler steps and CFG (`sde_noise`:
        `euler_sample`'s; `guidance_interval`: `guided_velocity`'s; None: the flow config's)."""
        cond = self.condition(backbone, prompts)  # (B, Nq, K)
        # Noise is drawn on the generator's device (CPU by default), then moved: a seeded CPU
        # generator gives the same images on any device.
        x_0 = torch.randn((len(prompts), self.cfg.num_tokens, self.dit_cfg.in_dim), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        x_0 = x_0.to(cond.device, cond.dtype)  # (B, N, L)
        result = self.flow.sample(self.dit, cond, x_0.shape[1:], x_0=x_0,
                                  num_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  generator=generator, return_trajectory=return_trajectory,
                                  sde_noise=sde_noise, guidance_interval=guidance_interval)
        features = self.denormalize(result.x_1)  # (B, N, F)
        return (features, result) if return_trajectory else features


def condition_variances(z: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """Variances (K,) of centred conditions z (M, K) along the axes (`standardize`) or the
    principal directions (`whiten`), and those directions as columns (K, K)."""
    if norm == "standardize":
        return z.var(dim=0), torch.eye(z.shape[1], dtype=z.dtype)
    var, basis = torch.linalg.eigh(z.T @ z / (len(z) - 1))  # ascending; (K,), (K, K)
    return var.clamp_min(0), basis
