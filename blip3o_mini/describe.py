"""What a config's model is made of: every component built on PyTorch's meta device (shapes, no
memory, no download), counted per component, and what that means for memory and FLOPs per GPU.

The components are the ones BLIP3-o's stage 2 touches (paper section 3, DESIGN.md section 1):

    backbone   the frozen understanding model (toy LM + projector, or Qwen2.5-VL-3B/7B)
    queries    the 64 learnable query tokens           } the only trainable parts of stage 2
    dit        the NextDiT generating 64 CLIP tokens   }
    clip       the CLIP vision tower that makes the targets (EVA02-E-14-plus for full runs)
    decoder    the pixel decoder (its own stage; BLIP3-o uses a pretrained one)

A config's `understanding:` section names a pretrained Qwen2.5-VL (`pretrained:`), or gives the
toy backbone's `BackboneConfig` fields under `backbone:` (the understanding stage's layout).
Qwen2.5-VL configs are written out below from the checkpoints' own `config.json` files, so
nothing is downloaded.

What the counts mean for memory per GPU and FLOPs per sample is in `sizing.py`
(`memory_estimate`, `train_flops_per_sample`), computed from a `ModelDescription`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .config import build, with_run_seed
from .sizing import MemoryEstimate, memory_estimate, train_flops_per_sample

__all__ = ["QWEN2_5_VL", "Components", "ComponentCount", "ModelDescription", "build_components", "describe",
           "describe_components", "generation_configs", "MemoryEstimate", "memory_estimate",
           "train_flops_per_sample"]  # the sizing functions are re-exported: describe + estimate in one place

# Hugging Face `config.json` of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct
# (huggingface.co/Qwen/Qwen2.5-VL-{7B,3B}-Instruct/blob/main/config.json): text model width,
# MLP width, layers, heads, KV heads, vocabulary, tied embeddings; the same 32-block, 1280-wide
# vision tower in both, projecting to the text width. Counts: 8,292,166,656 and 3,754,622,976.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31])
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
QWEN2_5_VL = {
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                         rms_norm_eps=1e-6, max_position_embeddings=128000, rope_parameters=_ROPE),
        vision_config=dict(_VISION, out_hidden_size=3584), tie_word_embeddings=False),
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                         rms_norm_eps=1e-6, max_position_embeddings=128000, rope_parameters=_ROPE,
                         tie_word_embeddings=True),
        vision_config=dict(_VISION, out_hidden_size=2048), tie_word_embeddings=True),
}


def qwen2_5_vl_config(name: str):
    """The `transformers.Qwen2_5_VLConfig` of a known Qwen2.5-VL checkpoint name."""
    from transformers import Qwen2_5_VLConfig

    if name not in QWEN2_5_VL:
        raise ValueError(f"understanding.pretrained {name!r} has no built-in config to describe; "
                         f"known: {sorted(QWEN2_5_VL)} (add its config.json numbers to describe.QWEN2_5_VL)")
    return Qwen2_5_VLConfig(**QWEN2_5_VL[name])


# ------------------------------------------------------------------------------ the sections
def split_section(section: dict | None, *extra: str) -> tuple[dict, dict]:
    """(dataclass fields, the `train:` and `extra` keys) of a stage section."""
    section = dict(section or {})
    side = {k: section.pop(k) for k in ("train", *extra) if k in section}
    return section, side


def generation_configs(cfg: dict):
    """(GeneratorConfig, GenerationTrainConfig, targets) of a whole config: `generation:` holds
    the generator's fields and `train:`; `data.targets` says whether stage 2 reads "features"
    (extracted once, blip3o-mini extract) or "images" (encoded every step)."""
    from .generation import GeneratorConfig
    from .training.generation import GenerationTrainConfig

    fields_, side = split_section(cfg.get("generation"))
    targets = (cfg.get("data") or {}).get("targets", "features")
    if targets not in ("features", "images"):
        raise ValueError(f"data.targets must be 'features' (extracted once, blip3o-mini extract) "
                         f"or 'images' (encoded every step), got {targets!r}")
    train_cfg = with_run_seed(build(GenerationTrainConfig, side.get("train")), cfg, side.get("train"))
    return build(GeneratorConfig, fields_), train_cfg, targets


# ------------------------------------------------------------------------------ building
@dataclass
class Components:
    """A config's modules (on the meta device for counting); `backbone_layers` are the LM
    decoder layers a prompt runs through (their weights do the matmul FLOPs)."""

    backbone: torch.nn.Module
    backbone_layers: torch.nn.Module
    generator: torch.nn.Module
    clip: torch.nn.Module
    decoder: torch.nn.Module
    notes: dict = field(default_factory=dict)


def clip_num_tokens(visual: torch.nn.Module) -> int:
    """Tokens the vision tower runs on per image (patches + class/prefix tokens)."""
    if hasattr(visual, "trunk"):  # timm tower (EVA02, SigLIP2)
        return visual.trunk.patch_embed.num_patches + visual.trunk.num_prefix_tokens
    gh, gw = visual.grid_size
    return gh * gw + 1


def build_clip_tower(cfg: dict, device: str = "meta") -> tuple[torch.nn.Module, int]:
    """(open_clip vision tower, feature width) of the `clip:` section, random weights."""
    import open_clip

    from .clip_models import register_model_configs
    from .vision import ClipConfig, _quiet

    clip_cfg = build(ClipConfig, split_section(cfg.get("clip"))[0])
    register_model_configs()
    with torch.device(device), _quiet(True):
        model = open_clip.create_model(clip_cfg.model_name, device=device, force_image_size=clip_cfg.image_size)
    visual = model.visual
    width = visual.trunk.num_features if hasattr(visual, "trunk") else visual.transformer.width
    return visual, width


def build_backbone(cfg: dict, vision_dim: int, device: str = "meta"):
    """(backbone module, its LM decoder layers, hidden size, note) with random weights."""
    section = cfg.get("understanding") or {}
    if section.get("pretrained"):
        from transformers import Qwen2_5_VLForConditionalGeneration

        qcfg = qwen2_5_vl_config(section["pretrained"])
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(qcfg)
        return model, model.model.language_model.layers, qcfg.text_config.hidden_size, section["pretrained"]
    from .backbone import BackboneConfig, ToyBackbone
    from .data import generate_split
    from .tokenizer import build_tokenizer, shapesworld_texts

    bcfg = build(BackboneConfig, {"vision_dim": vision_dim, **(section.get("backbone") or {})})
    rows = generate_split(0, "train", 300)  # ShapesWorld's ~400-word vocabulary is complete by then
    tokenizer = build_tokenizer(shapesworld_texts(rows), vocab_size=section.get("vocab_size", 1024))
    with torch.device(device):
        model = ToyBackbone(bcfg, tokenizer)
    return model, model.lm.model.layers, bcfg.hidden_size, "understanding stage"


def build_components(cfg: dict, device: str = "meta") -> Components:
    from .decoder import DecoderConfig, PixelDecoder
    from .generation import Blip3oGenerator

    clip, feature_dim = build_clip_tower(cfg, device)
    backbone, layers, hidden, backbone_note = build_backbone(cfg, feature_dim, device)
    gen_cfg, _, targets = generation_configs(cfg)
    dec_cfg = build(DecoderConfig, {"feature_dim": feature_dim, **split_section(cfg.get("decoder"), "eval")[0]})
    with torch.device(device):
        generator = Blip3oGenerator(gen_cfg, feature_dim=feature_dim, cond_dim=hidden)
        decoder = PixelDecoder(dec_cfg)
    clip_section = cfg.get("clip") or {}
    clip_note = (f"pretrained ({clip_section.get('model_name')} {clip_section['pretrained']})"
                 if clip_section.get("pretrained") else "clip stage")
    notes = {"backbone": backbone_note if backbone_note == "understanding stage" else f"pretrained ({backbone_note})",
             "queries": "generation stage", "dit": "generation stage", "clip": clip_note,
             "decoder": "decoder stage", "targets": targets}
    return Components(backbone, layers, generator, clip, decoder, notes)


# ------------------------------------------------------------------------------ counting
@dataclass
class ComponentCount:
    name: str
    trainable: int  # trained by stage 2 (generation)
    frozen: int
    trained_by: str

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass
class ModelDescription:
    config: str
    components: list[ComponentCount]
    dims: dict  # widths and lengths the estimates need

    def __getitem__(self, name: str) -> ComponentCount:
        return next(c for c in self.components if c.name == name)

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.components)

    @property
    def frozen(self) -> int:
        return sum(c.frozen for c in self.components)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def to_dict(self) -> dict:
        return {"config": self.config, "dims": self.dims,
                "components": {c.name: {"trainable": c.trainable, "frozen": c.frozen, "total": c.total,
                                        "trained_by": c.trained_by} for c in self.components},
                "total": {"trainable": self.trainable, "frozen": self.frozen, "total": self.total}}

    def table(self) -> str:
        lines = [f"{self.config}: parameters per component (stage 2 trains the queries and the DiT)",
                 f"{'component':<10} {'trainable':>15} {'frozen':>15} {'total':>15}  trained by"]
        for c in self.components:
            lines.append(f"{c.name:<10} {c.trainable:>15,} {c.frozen:>15,} {c.total:>15,}  {c.trained_by}")
        lines.append(f"{'total':<10} {self.trainable:>15,} {self.frozen:>15,} {self.total:>15,}")
        return "\n".join(lines)


def count(module: torch.nn.Module) -> int:
    """Parameters of a module, shared (tied) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def describe(cfg: dict, name: str = "config") -> ModelDescription:
    """Per-component parameter counts of `cfg`'s model, built on the meta device."""
    return describe_components(build_components(cfg, "meta"), name)


def describe_components(c: Components, name: str) -> ModelDescription:
    """Counts and widths of already built components (any device)."""
    g = c.generator
    queries, dit = g.queries.numel(), count(g.dit)
    components = [
        ComponentCount("backbone", 0, count(c.backbone), c.notes["backbone"]),
        ComponentCount("queries", queries, 0, c.notes["queries"]),
        ComponentCount("dit", dit, 0, c.notes["dit"]),
        ComponentCount("clip", 0, count(c.clip), c.notes["clip"] + ", vision tower"),
        ComponentCount("decoder", 0, count(c.decoder), c.notes["decoder"]),
    ]
    d = g.dit_cfg
    first = c.backbone_layers[0]
    dims = {"backbone_layers": len(c.backbone_layers), "backbone_hidden": g.queries.shape[-1],
            "backbone_layer_params": count(c.backbone_layers),
            "backbone_ffn": first.mlp.gate_proj.out_features,
            "dit_dim": d.dim, "dit_depth": d.depth, "dit_ffn": d.ffn_hidden_dim, "num_tokens": g.cfg.num_tokens,
            "num_query_tokens": g.cfg.num_query_tokens, "feature_dim": g.feature_dim,
            "gradient_checkpointing": d.gradient_checkpointing, "targets": c.notes["targets"],
            "clip_tokens": clip_num_tokens(c.clip)}
    return ModelDescription(name, components, dims)


def describe_json(desc: ModelDescription) -> str:
    return json.dumps(desc.to_dict(), indent=2)

