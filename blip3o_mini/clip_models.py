"""open_clip model configs for the CLIP encoder (DESIGN.md section 2, "CLIP encoder" row).

The toy encoder is a real open_clip model config, `blip3o_mini/model_configs/*.json`, registered
with `open_clip.add_model_config`, so `open_clip.create_model(name)` builds the toy model and
the full run's `EVA02-E-14-plus` (BLIP3-o's target encoder) through one code path.

Also here:
- `tiny_eva_config()`: an open_clip config derived from EVA02-E-14-plus (timm-based vision
  tower: post-norm EVA blocks, patch 14, SwiGLU-free MLP ratio 15360/1792) at tiny width and
  depth, so the timm code path and the 32x32 -> 8x8 pooling are tested without a download.
- `resolve_pretrained()`: finds pretrained weights in the local Hugging Face cache, or fails
  fast with one line naming the missing weights and how to pre-download them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TOY_MODEL = "blip3o-mini-tiny-clip"
TINY_EVA_MODEL = "blip3o-mini-tiny-eva02-E-14-plus"
TINY_EVA_TIMM = "blip3o_mini_tiny_eva02_enormous_patch14_clip"
SAFE_WEIGHTS = "open_clip_model.safetensors"  # open_clip's safetensors name on the HF hub


def register_model_configs() -> None:
    """Make the package's JSON configs (and the tiny EVA test config) known to open_clip."""
    if TOY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    if TINY_EVA_MODEL not in open_clip.list_models():
        _register_tiny_eva_timm()
        from open_clip import factory

        factory._MODEL_CONFIGS[TINY_EVA_MODEL] = tiny_eva_config()


def _register_tiny_eva_timm() -> None:
    """A timm model with the arguments of `eva02_enormous_patch14_clip_224` (the trunk of
    open_clip's EVA02-E-14-plus) except width 64, depth 2, 2 heads."""
    import timm
    from timm.models import eva, register_model

    if timm.is_model(TINY_EVA_TIMM):
        return

    def blip3o_mini_tiny_eva02_enormous_patch14_clip(pretrained: bool = False, **kwargs):
        args = dict(img_size=224, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                    mlp_ratio=15360 / 1792, use_post_norm=True,
                    global_pool=kwargs.pop("global_pool", "token"))
        return eva._create_eva("eva02_enormous_patch14_clip_224", pretrained=False, **dict(args, **kwargs))

    blip3o_mini_tiny_eva02_enormous_patch14_clip.__name__ = TINY_EVA_TIMM
    register_model(blip3o_mini_tiny_eva02_enormous_patch14_clip)


def tiny_eva_config() -> dict:
    """open_clip's EVA02-E-14-plus config with a tiny timm trunk and text tower (random weights)."""
    cfg = copy.deepcopy(open_clip.get_model_config("EVA02-E-14-plus"))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"]["timm_model_name"] = TINY_EVA_TIMM
    cfg["text_cfg"].update(width=32, heads=2, layers=1, context_length=16)
    return cfg


def resolve_pretrained(model_name: str, tag: str, cache_dir: str | None = None) -> str:
    """Local path of the safetensors weights for open_clip `model_name` / `tag`.

    Never downloads and never returns a pickle: a missing file raises one FileNotFoundError
    line saying which weights are missing and how to pre-download them.
    """
    from huggingface_hub import try_to_load_from_cache

    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"unknown pretrained tag {tag!r} for open_clip model {model_name!r}; "
                         f"known tags: {tags or 'none'}")
    hub = pcfg.get("hf_hub", "")
    if not hub:
        raise ValueError(f"open_clip weights {model_name}/{tag} are not on the Hugging Face hub; "
                         "pass a local .safetensors path as `clip.pretrained` instead")
    repo_id = hub.rstrip("/").split("/")[0] + "/" + hub.rstrip("/").split("/")[1]
    path = try_to_load_from_cache(repo_id, SAFE_WEIGHTS, cache_dir=cache_dir)
    if isinstance(path, str) and Path(path).exists():
        return path
    raise FileNotFoundError(
        f"pretrained weights for open_clip {model_name} ({tag!r}) are not in the local cache: "
        f"missing {repo_id}/{SAFE_WEIGHTS}; pre-download them on a machine with internet with "
        f"`huggingface-cli download {repo_id} {SAFE_WEIGHTS}` (HF_HOME or --cache-dir must match "
        "this machine's Hugging Face cache)")
