"""The CLIP encoder whose patch features BLIP3-o's diffusion transformer learns to generate.

Mirrors the paper's target definition (section 3.2, DESIGN.md section 1): the tokens of the
**last transformer block** of the CLIP vision tower, class token dropped, laid out on their
patch grid and **average-pooled to 8x8 = 64 tokens** when the grid is larger. EVA02-E-14-plus
at 448 px has a 32x32 grid (pooled 4x4); the toy model (64 px, patch 8) has an 8x8 grid, which
the same code leaves as is. BLIP3-o does not normalise these features; `normalize_features`
switches per-dimension standardisation on (statistics measured on the training split and saved
with the checkpoint either way).

Both open_clip vision towers are handled by one call, `visual.forward_intermediates(...)`:
open_clip's own `VisionTransformer` (the toy model, OpenAI/LAION ViTs) and the timm-based
`TimmModel` (EVA02, SigLIP2). Tokens are taken before the tower's final LayerNorm.

Shape glossary: B batch, H/W image height/width, h/w token grid, G pooled grid side (8),
N = G*G tokens (64), D vision width (feature dim), E contrastive embedding dim, T text tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .artifacts import atomic_write_json, load_tensors, save_tensors
from .clip_models import SAFE_WEIGHTS, TOY_MODEL, register_model_configs, resolve_pretrained

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own 'local-dir:' layout
CLIP_CONFIG = "clip_config.json"
STATS_FILE = "feature_stats.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class ClipConfig:
    """Which open_clip model, and how its patch tokens become the 64 generation targets."""

    model_name: str = TOY_MODEL  # any open_clip name, e.g. "EVA02-E-14-plus"
    pretrained: str | None = None  # open_clip tag (e.g. "laion2b_s9b_b144k") or .safetensors path
    image_size: int | None = None  # None: the config's own; 448 for BLIP3-o's EVA02-E-14-plus
    pool_grid: int = 8  # tokens are average-pooled to pool_grid x pool_grid
    normalize_features: bool = False  # BLIP3-o: False (raw last-block tokens)


def pool_to_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool a (B, D, h, w) token grid to (B, D, size, size); h, w multiples of size."""
    B, D, h, w = grid.shape
    if h % size or w % size:
        raise ValueError(f"token grid {h}x{w} is not a multiple of pool_grid {size}; choose an image "
                         f"size whose patch grid is divisible by {size}")
    if (h, w) == (size, size):
        return grid
    return F.avg_pool2d(grid, kernel_size=(h // size, w // size))  # (B, D, size, size)


@contextlib.contextmanager
def _quiet(active: bool):
    """Silence open_clip's 'No pretrained weights loaded' warning where that is intended."""
    previous = logging.root.manager.disable
    if active:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class ClipEncoder(nn.Module):
    """An open_clip CLIP model + the BLIP3-o feature extraction on top of it."""

    def __init__(self, cfg: ClipConfig | None = None, *, model_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ClipConfig()
        register_model_configs()
        if model_dir is None:  # from the open_clip registry (+ pretrained weights if named)
            self.model_cfg = open_clip.get_model_config(cfg.model_name)
            if self.model_cfg is None:
                raise ValueError(f"unknown open_clip model {cfg.model_name!r}; see open_clip.list_models()")
            weights = None
            if cfg.pretrained:
                weights = cfg.pretrained if cfg.pretrained.endswith(".safetensors") else \
                    resolve_pretrained(cfg.model_name, cfg.pretrained)
            with _quiet(weights is None):  # random init (to be trained) is expected here
                self.model = open_clip.create_model(cfg.model_name, pretrained=weights,
                                                    force_image_size=cfg.image_size)
        else:  # from `save`'s directory, with open_clip's own 'local-dir:' config reader
            self.model_cfg = json.loads((Path(model_dir) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
            with _quiet(True):  # weights are loaded right below, from safetensors
                self.model = open_clip.create_model(f"local-dir:{model_dir}", load_weights=False,
                                                    force_image_size=cfg.image_size)
            self.model.load_state_dict(load_tensors(Path(model_dir) / SAFE_WEIGHTS))
        if cfg.image_size:
            self.model_cfg["vision_cfg"]["image_size"] = cfg.image_size
        self.model.eval()
        pp = self.model.visual.preprocess_cfg
        self.image_size = tuple(pp["size"]) if isinstance(pp["size"], (tuple, list)) else (pp["size"],) * 2
        self.feature_dim = self._vision_width()
        self.register_buffer("pixel_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        # per-dimension statistics of the raw features (set by `set_feature_stats`, saved)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))
        if model_dir is not None and (Path(model_dir) / STATS_FILE).exists():
            stats = load_tensors(Path(model_dir) / STATS_FILE)
            self.set_feature_stats(stats["mean"], stats["std"])
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name, context_length=self.context_length)

    def _vision_width(self) -> int:
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # timm tower (EVA02, SigLIP2)
            return visual.trunk.num_features
        return visual.transformer.width

    @property
    def context_length(self) -> int:
        return self.model_cfg["text_cfg"].get("context_length", 77)

    @property
    def num_tokens(self) -> int:
        return self.cfg.pool_grid ** 2

    # -- images ------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] or float in [0, 1] -> normalised (B, 3, S, S).

        Documented conversions: other sizes are resized (bilinear, antialiased) to the model's
        image size; one channel (grey) is repeated to RGB. Anything else is a ValueError.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be a batch (B, 3, H, W), got shape {tuple(images.shape)}; "
                             "add a batch dimension with images[None]")
        if images.shape[1] not in (1, 3):
            hint = " (channels-last? use images.permute(0, 3, 1, 2))" if images.shape[-1] in (1, 3, 4) else ""
            raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels in dim 1, got shape "
                             f"{tuple(images.shape)}{hint}; convert RGBA/other modes to RGB first")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            lo, hi = images.min().item(), images.max().item()
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"float images must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}]; "
                                 "pass uint8 images or divide by 255")
            x = images.float()
        else:
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        x = x.to(self.pixel_mean.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std  # (B, 3, S, S)

    def token_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block patch tokens on their grid, class/prefix tokens dropped: (B, D, h, w)."""
        out = self.model.visual.forward_intermediates(
            self.preprocess(images), indices=1, intermediates_only=True, output_fmt="NCHW",
            normalize_intermediates=False)
        return out["image_intermediates"][-1]  # (B, D, h, w)

    def encode_tokens(self, images: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """BLIP3-o's generation target: (B, N=64, D) tokens (standardised if `normalize`)."""
        grid = pool_to_grid(self.token_grid(images), self.cfg.pool_grid)  # (B, D, G, G)
        tokens = rearrange(grid, "b d h w -> b (h w) d")  # (B, N, D)
        if self.cfg.normalize_features if normalize is None else normalize:
            tokens = (tokens - self.feature_mean) / self.feature_std
        return tokens

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map generated tokens back to raw feature space (identity when not normalising)."""
        if not self.cfg.normalize_features:
            return tokens
        return tokens * self.feature_std + self.feature_mean  # (B, N, D)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Record per-dimension (D,) statistics of the raw features (train split)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Contrastive image embedding (B, E), unit norm by default."""
        return self.model.encode_image(self.preprocess(images), normalize=normalize)

    # -- text --------------------------------------------------------------------------
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        return self.tokenizer(texts)  # (B, T) int64

    def encode_text(self, texts: list[str] | str | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Contrastive text embedding (B, E) of captions (or of token ids (B, T))."""
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.model.encode_text(ids.to(self.pixel_mean.device), normalize=normalize)

    # -- identity, save, load ------------------------------------------------------------
    def weights_hash(self) -> str:
        """Hash of every weight, the feature statistics and the feature settings: a feature
        cache keyed by it can never serve features of a different encoder."""
        settings = {k: v for k, v in asdict(self.cfg).items() if k != "pretrained"}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Write safetensors weights + open_clip config + ClipConfig (+ feature stats)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / SAFE_WEIGHTS, self.model.state_dict())
        save_tensors(d / STATS_FILE, {"mean": self.feature_mean, "std": self.feature_std},
                     metadata={"normalize_features": str(self.cfg.normalize_features)})
        preprocess = {k: list(v) if isinstance(v, tuple) else v
                      for k, v in self.model.visual.preprocess_cfg.items()}
        atomic_write_json(d / OPEN_CLIP_CONFIG, {"model_cfg": self.model_cfg, "preprocess_cfg": preprocess})
        atomic_write_json(d / CLIP_CONFIG, asdict(self.cfg))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "ClipEncoder":
        """Rebuild from `save`'s directory; only safetensors are read, pickles are refused."""
        d = Path(directory)
        pickles = [p.name for p in ([d] if d.is_file() else d.glob("*")) if p.suffix in PICKLE_SUFFIXES]
        if pickles and (d.is_file() or not (d / SAFE_WEIGHTS).is_file()):
            raise ValueError(f"{d}: refusing pickle checkpoint(s) {pickles} (loading a pickle can run "
                             "arbitrary code); save the encoder with ClipEncoder.save (safetensors)")
        if d.is_file():
            raise ValueError(f"{d}: pass the directory written by ClipEncoder.save, not a file")
        for name in (SAFE_WEIGHTS, OPEN_CLIP_CONFIG, CLIP_CONFIG):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} is missing; a ClipEncoder directory holds "
                                        f"{SAFE_WEIGHTS}, {OPEN_CLIP_CONFIG} and {CLIP_CONFIG} (ClipEncoder.save)")
        cfg = ClipConfig(**json.loads((d / CLIP_CONFIG).read_text()))
        cfg.pretrained = None  # the weights come from this directory
        return cls(cfg, model_dir=d)
