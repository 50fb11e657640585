"""NextDiT: the diffusion transformer that generates BLIP3-o's 64 CLIP feature tokens.

Mirrors BLIP3-o's generation head (arXiv 2505.09568, section 3; official code
`blip3o/model/lumina_nextdit2d.py` + `nextdit_crossattn.py`), which is diffusers'
`LuminaNextDiT2DModel` (Lumina-Next, "Next-DiT") with a caption projection added in front.
What is mirrored, block by block:

- tokens: patch size 1 on the 8x8 grid of CLIP tokens, so the "patch embedding" is one Linear
  per token (`patch_size: 2`, Lumina-Next's own default, folds each 2x2 block of tokens into
  one: a 4x4 grid of 16 tokens, a quarter of the work per image); 2D RoPE (half of each head's
  channels rotate with the row, half with the column, theta 10000), applied to queries and keys
  of self-attention and to the *queries only* of cross-attention (the condition has no positions);
  no absolute positions (`pos_embed: sincos` adds the original DiT's 2D sin-cos table to the
  tokens: on the toy, most images then came out blank; docs/status.md);
- qk-norm: LayerNorm across all heads on q and k before the head split (diffusers'
  `layer_norm_across_heads`);
- the condition `Q` (B, Nq, cond_dim) goes through a caption projection (Linear, tanh-GELU,
  Linear, as PixArt-alpha's `PixArtAlphaTextProjection`) to the model width, then an RMSNorm,
  into a cross-attention in every block whose per-head output is scaled by tanh(gate), gate
  zero-initialised; self- and cross-attention heads are summed and share one output projection;
- conditioning vector c = MLP(sinusoid(t)) + Linear(LayerNorm(masked mean of projected Q)),
  width min(dim, 1024); each block maps SiLU(c) to (scale_attn, gate_attn, scale_ffn,
  gate_ffn) and uses RMSNorm "sandwich" norms: x + tanh(gate) * RMSNorm(sublayer(RMSNorm(x) *
  (1 + scale))); SwiGLU feed-forward; final layer LayerNorm * (1 + scale(c)) then Linear.

Simplified or changed, and why:

- Zero init as in the original Lumina-Next/DiT (adaLN-Zero): every modulation Linear and the
  final output Linear start at zero, so a fresh block is exactly the identity (tanh(0) = 0)
  and a fresh model predicts v = 0. (diffusers' port leaves these at PyTorch's default init.)
- t in [0, 1] (0 = noise, see flow.py) is multiplied by `time_scale` = 1000 before the
  sinusoidal embedding, as diffusers' flow pipelines feed `sigma * 1000`; Lumina-Next feeds t
  raw, which uses only the lowest frequencies.
- Feed-forward width: `ffn_mult * dim` rounded up to `multiple_of`, default 8/3 (the LLaMA
  SwiGLU convention of Lumina-Next and of diffusers' `LuminaNextDiT2DModel`); the full config
  then has ~1.4B parameters, the paper's figure. BLIP3-o's copy passes 4 * dim straight to
  diffusers' feed-forward (~1.65B); set `ffn_mult: 4.0` to match it.
- No GQA (kv heads = heads), no learn_sigma, no padding / variable resolution, no
  NTK/time-aware RoPE scaling; fused self-attention qkv; RoPE pairs concatenated (rows, then
  columns) instead of interleaved, a fixed channel permutation with the same relative-position
  property.

Shape glossary: B batch, N = grid*grid image tokens (64), P patch size, Nq condition tokens,
D model width (`dim`), H heads, Dh = D / H head width, C = min(D, 1024) conditioning width,
F feature width (`in_dim`, the CLIP width), K = `cond_dim` (the LLM width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# BLIP3-o 8B: EVA-CLIP 1792-d tokens, Qwen2.5-VL-7B hidden size 3584 (use as YAML overrides).
FULL_DIT = dict(in_dim=1792, cond_dim=3584, dim=1792, depth=24, num_heads=28)


@dataclass
class DiTConfig:
    in_dim: int = 128  # F: CLIP feature width (toy CLIP)
    cond_dim: int = 256  # K: width of the condition Q (toy LLM hidden size)
    dim: int = 256  # D
    depth: int = 6
    num_heads: int = 4  # H; head width D/H must be a multiple of 4 for 2D RoPE
    grid: int = 8  # tokens form a grid x grid image: N = 64
    patch_size: int = 1  # P: P x P tokens of the grid become one DiT token (N / P^2 of them)
    ffn_mult: float = 8 / 3
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # none: 2D RoPE only, as Lumina-Next and BLIP3-o; sincos: also add DiT's (Peebles & Xie) fixed
    # 2D sin-cos positions to the embedded tokens (GenEval-mini 0.225 against 0.309: each token
    # learns its place's likeliest content, background; docs/status.md)
    pos_embed: str = "none"
    time_scale: float = 1000.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 4:
            raise ValueError(f"dim {self.dim} / num_heads {self.num_heads} must give a head width "
                             "divisible by 4 (2D RoPE rotates pairs along two axes)")
        if self.patch_size < 1 or self.grid % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide the grid {self.grid} "
                             "(set generation.dit.patch_size to 1, or to a divisor of the grid)")
        if self.pos_embed not in ("none", "sincos"):
            raise ValueError(f"generation.dit.pos_embed must be 'none' or 'sincos', got {self.pos_embed!r}")

    @property
    def token_grid(self) -> int:  # the DiT's own grid: grid / P tokens a side
        return self.grid // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def cond_embed_dim(self) -> int:  # C, as Lumina-Next: min(dim, 1024)
        return min(self.dim, 1024)

    @property
    def ffn_hidden_dim(self) -> int:
        m = self.multiple_of
        return m * math.ceil(int(self.ffn_mult * self.dim) / m)


# ---------------------------------------------------------------------------- 2D positions: RoPE, sin-cos tables
def grid_positions(grid: int) -> Tensor:
    """(row, column) of each token in raster order: (N, 2)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()  # (N, 2)


def sincos_grid(side: int, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's fixed 2D sin-cos positions as a row table and a column table, (G, H) each: the row's
    sines and cosines fill the first half of the width, the column's the second, so their sum is
    MAE's concatenation. Unit amplitude, ordered from the start (each low frequency's sine rises
    with the index), where a random start at std 0.02 stays ~30x smaller than the projected tokens
    through a toy run (docs/status.md)."""
    half = hidden_size // 2
    freqs = 1.0 / 10000 ** (torch.arange(half // 2) / (half // 2))  # (H/4,)
    angles = torch.arange(side)[:, None] * freqs  # (G, H/4)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # (G, H/2)
    row, col = torch.zeros(side, hidden_size), torch.zeros(side, hidden_size)
    row[:, :half], col[:, half:half * 2] = table, table
    return row, col


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angle of each channel pair: the first Dh/4 pairs turn with the row, the last
    Dh/4 with the column, at frequencies theta^(-2i/(Dh/2)). positions (N, 2) -> (N, Dh/2)."""
    freqs = theta ** -(torch.arange(0, head_dim // 2, 2, dtype=torch.float32,
                                    device=positions.device) / (head_dim // 2))  # (Dh/4,)
    pos = positions.float()
    return torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=-1)  # (N, Dh/2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, Dh) by angles (N, Dh/2), in float32 as
    Lumina does. Lumina reads each pair as a complex number times e^(i * angle); the same
    product written out in reals lets torch.compile fuse it (it cannot generate complex code)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, N, Dh/2) each: real, imaginary
    cos, sin = angles.cos(), angles.sin()  # (N, Dh/2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)  # (B, H, N, Dh)


# ---------------------------------------------------------------------------- embeddings
def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos, sin] of t (B,) -> (B, dim), as DiT / diffusers (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class CaptionProjection(nn.Sequential):
    """Q (B, Nq, K) -> (B, Nq, D): Linear, tanh-GELU, Linear (PixArt-alpha's text projection)."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__(nn.Linear(cond_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))


class TimeCondEmbedding(nn.Module):
    """c = MLP(sinusoid(t)) + Linear(LayerNorm(masked mean of projected Q)): (B, C)."""

    def __init__(self, cfg: DiTConfig, freq_dim: int = 256):
        super().__init__()
        C, self.freq_dim, self.time_scale = cfg.cond_embed_dim, freq_dim, cfg.time_scale
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, C), nn.SiLU(), nn.Linear(C, C))
        self.pool_proj = nn.Sequential(nn.LayerNorm(cfg.dim, eps=1e-6), nn.Linear(cfg.dim, C))

    def forward(self, t: Tensor, cond: Tensor, cond_mask: Tensor | None) -> Tensor:
        t_freq = timestep_embedding(t * self.time_scale, self.freq_dim).to(cond.dtype)  # (B, 256)
        if cond_mask is None:
            pooled = cond.mean(dim=1)  # (B, D)
        else:
            m = cond_mask.to(cond.dtype)[..., None]  # (B, Nq, 1)
            pooled = (cond * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)  # (B, D)
        return self.time_mlp(t_freq) + self.pool_proj(pooled)  # (B, C)


# ---------------------------------------------------------------------------- the block
class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that follows the input's dtype, so bf16 autocast keeps the fused kernel
    (plain nn.RMSNorm falls back to a slow path when input and weight dtypes differ)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, N, D)


class NextDiTBlock(nn.Module):
    """Self-attention (2D RoPE) + tanh-gated cross-attention to Q, one shared output
    projection, SwiGLU; RMSNorm sandwich norms modulated by c (adaLN-Zero, no shift)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, H, eps = cfg.dim, cfg.num_heads, cfg.norm_eps
        self.num_heads = H
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_embed_dim, 4 * D))
        self.attn_norm_in, self.attn_norm_out = RMSNorm(D, eps=eps), RMSNorm(D, eps=eps)
        self.ffn_norm_in, self.ffn_norm_out = RMSNorm(D, eps=eps), RMSNorm(D, eps=eps)
        # self-attention
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_norm, self.k_norm = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        # cross-attention to the projected condition
        self.cond_norm = RMSNorm(D, eps=eps)
        self.cross_q = nn.Linear(D, D, bias=False)
        self.cross_kv = nn.Linear(D, 2 * D, bias=False)
        self.cross_q_norm, self.cross_k_norm = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        self.cross_gate = nn.Parameter(torch.zeros(H))  # tanh(0) = 0: no cross-attention at start
        self.out = nn.Linear(D, D, bias=False)  # shared by both attentions
        self.ffn = SwiGLU(D, cfg.ffn_hidden_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def forward(self, x: Tensor, c: Tensor, cond: Tensor, attn_mask: Tensor | None,
                angles: Tensor) -> Tensor:
        B, N, D = x.shape
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.modulation(c)[:, None].chunk(4, dim=-1)  # (B, 1, D)

        h = self.attn_norm_in(x) * (1 + scale_attn)  # (B, N, D)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # (B, N, D) each
        q, k, v = self.split_heads(self.q_norm(q)), self.split_heads(self.k_norm(k)), self.split_heads(v)
        q, k = apply_rope(q, angles), apply_rope(k, angles)  # (B, H, N, Dh)
        self_out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)

        cq = apply_rope(self.split_heads(self.cross_q_norm(self.cross_q(h))), angles)  # (B, H, N, Dh)
        ck, cv = self.cross_kv(self.cond_norm(cond)).chunk(2, dim=-1)  # (B, Nq, D) each
        ck, cv = self.split_heads(self.cross_k_norm(ck)), self.split_heads(cv)  # (B, H, Nq, Dh)
        cross_out = F.scaled_dot_product_attention(cq, ck, cv, attn_mask=attn_mask)  # (B, H, N, Dh)

        mixed = self_out + self.cross_gate.tanh()[None, :, None, None] * cross_out  # (B, H, N, Dh)
        attn = self.out(rearrange(mixed, "b h n d -> b n (h d)"))  # (B, N, D)
        x = x + gate_attn.tanh() * self.attn_norm_out(attn)  # (B, N, D)

        ffn = self.ffn(self.ffn_norm_in(x) * (1 + scale_ffn))  # (B, N, D)
        return x + gate_ffn.tanh() * self.ffn_norm_out(ffn)  # (B, N, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) * (1 + scale(c)), then Linear to the feature width: (B, N, F)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.scale = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_embed_dim, cfg.dim))
        self.linear = nn.Linear(cfg.dim, cfg.in_dim * cfg.patch_size ** 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.norm(x) * (1 + self.scale(c)[:, None]))  # (B, N/P^2, P^2 F)


# ---------------------------------------------------------------------------- the model
class NextDiT(nn.Module):
    """v_pred = NextDiT(x_t (B, N, F), t (B,), cond (B, Nq, K), cond_mask (B, Nq) | None)."""

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        self.x_embed = nn.Linear(cfg.in_dim * cfg.patch_size ** 2, cfg.dim)  # one Linear per patch
        self.cond_proj = CaptionProjection(cfg.cond_dim, cfg.dim)
        self.time_cond = TimeCondEmbedding(cfg)
        self.blocks = nn.ModuleList(NextDiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.register_buffer("positions", grid_positions(cfg.token_grid), persistent=False)  # (N/P^2, 2)
        self.register_buffer("pos_table", self.absolute_positions(cfg), persistent=False)  # (N/P^2, D) or (0,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # adaLN-Zero: a fresh block is the identity
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
            nn.init.zeros_(block.cross_gate)
        for lin in (self.final.scale[-1], self.final.linear):  # a fresh model predicts v = 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @staticmethod
    def absolute_positions(cfg: DiTConfig) -> Tensor:
        """`pos_embed: sincos`: MAE's 2D sin-cos table, row in the first half of the width and
        column in the second, one row per token in raster order (N/P^2, D); else empty."""
        if cfg.pos_embed == "none":
            return torch.zeros(0)
        row, col = sincos_grid(cfg.token_grid, cfg.dim)  # (G, D) each
        return (row[:, None] + col[None, :]).flatten(0, 1)  # (G*G, D)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        B, N, F_ = x_t.shape
        if (N, F_) != (cfg.grid ** 2, cfg.in_dim):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; NextDiT expects (B, {cfg.grid ** 2}, "
                             f"{cfg.in_dim}) (grid {cfg.grid}x{cfg.grid}, in_dim {cfg.in_dim})")
        if cond.ndim != 3 or cond.shape[0] != B or cond.shape[-1] != cfg.cond_dim:
            raise ValueError(f"cond has shape {tuple(cond.shape)}; expected ({B}, Nq, {cfg.cond_dim})")
        if t.shape != (B,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({B},), one time per sample")
        attn_mask = None
        if cond_mask is not None:
            if cond_mask.shape != cond.shape[:2]:
                raise ValueError(f"cond_mask has shape {tuple(cond_mask.shape)}; expected {tuple(cond.shape[:2])}")
            attn_mask = cond_mask.bool()[:, None, None, :]  # (B, 1, 1, Nq): keys to attend to
            if not attn_mask.any(dim=-1).all():
                raise ValueError("cond_mask masks out every condition token of some sample; keep at "
                                 "least one (the null condition is zeros, not an empty mask)")

        cond = self.cond_proj(cond)  # (B, Nq, D)
        c = self.time_cond(t, cond, cond_mask)  # (B, C)
        x = self.x_embed(self.patchify(x_t))  # (B, N/P^2, D)
        if cfg.pos_embed == "sincos":
            x = x + self.pos_table.to(x.dtype)  # (B, N/P^2, D): absolute positions in the values too
        angles = rope_angles(self.positions, cfg.head_dim, cfg.rope_theta)  # (N/P^2, Dh/2)
        for block in self.blocks:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, cond, attn_mask, angles, use_reentrant=False)
            else:
                x = block(x, c, cond, attn_mask, angles)  # (B, N/P^2, D)
        return self.unpatchify(self.final(x, c))  # (B, N, F)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, N, F) tokens in raster order -> (B, N/P^2, P^2 F): each P x P block of the grid,
        in raster order of blocks, its tokens' features concatenated row by row."""
        P, G = self.cfg.patch_size, self.cfg.token_grid
        return rearrange(x, "b (gh ph gw pw) f -> b (gh gw) (ph pw f)", gh=G, gw=G, ph=P, pw=P)

    def unpatchify(self, x: Tensor) -> Tensor:
        """The inverse of `patchify`: (B, N/P^2, P^2 F) -> (B, N, F)."""
        P, G = self.cfg.patch_size, self.cfg.token_grid
        return rearrange(x, "b (gh gw) (ph pw f) -> b (gh ph gw pw) f", gh=G, gw=G, ph=P, pw=P)
