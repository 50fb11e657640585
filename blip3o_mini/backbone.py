"""The understanding backbone: CLIP image tokens -> MLP projector -> a small causal LM.

BLIP3-o's backbone is Qwen2.5-VL, used frozen: it answers questions about images (its own
understanding ability, trained LLaVA-style before BLIP3-o ever sees it), and for generation it
reads a chat prompt, an `[IMG]` marker and 64 learnable query tokens and hands the last-layer
hidden states at the query positions to the diffusion transformer. `Backbone` is that contract;
`ToyBackbone` (here) and `QwenVLBackbone` (`qwen_vl.py`) implement it.

The toy model is LLaVA-1.5's recipe at ShapesWorld scale (nanoVLM's layout: vision encoder +
modality projector + LM): the 64 CLIP tokens of stage 1a go through a two-layer GELU MLP
(LLaVA's `mlp2x_gelu`, `llava/model/multimodal_projector/builder.py`) and replace the 64 image
placeholder tokens of the prompt in `inputs_embeds` (Qwen2.5-VL does the same with
`masked_scatter` on its `<|image_pad|>` positions). The LM is a randomly initialised
`transformers` Qwen3 (any causal-LM `model_type` works).

Shape glossary: B batch, T tokens, N image tokens (64), Nq query tokens, K read positions,
D CLIP feature dim, H LM hidden size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from .artifacts import atomic_write_json, load_tensors, save_tensors
from .backbone_interface import Backbone, as_image_batch, gather_positions, positions_from_mask
from .dit import sincos_grid
from .tokenizer import chat_format_of, expand_image_placeholders, generation_prompt

WEIGHTS = "model.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
LM_CONFIG = "lm_config.json"  # the transformers config of the language model
TOKENIZER_DIR = "tokenizer"


@dataclass
class BackboneConfig:
    """Toy defaults; `vision_dim` and `num_image_tokens` follow the CLIP stage."""

    vision_dim: int = 128  # D: CLIP token width
    num_image_tokens: int = 64  # N: CLIP tokens per image (a square grid)
    merge_size: int = 1  # 2: merge 2x2 neighbouring tokens first (Qwen2.5-VL), N / 4 LM positions
    input_norm: bool = False  # LayerNorm on the CLIP tokens first (Qwen2.5-VL's PatchMerger `ln_q`)
    grid_positions: bool = False  # learned row + column embeddings on the image tokens (GridPositions)
    grid_init: str = "random"  # their start: "random" (std 0.02) or "sincos" (MAE's 2D sin-cos, unit scale)
    grid_scale: float = 1.0  # multiplies that start: sincos at 0.25 sits between the two (docs/status.md)
    lm_type: str = "qwen3"  # a transformers causal-LM model_type (qwen3, qwen2, llama, ...)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 512
    rope_theta: float = 10000.0


class Projector(nn.Module):
    """LLaVA-1.5's modality projector: Linear -> GELU -> Linear, CLIP width D to LM width H.

    With `merge_size` m > 1 and `input_norm` it is Qwen2.5-VL's `PatchMerger`: each token is
    normalised, the m x m neighbouring tokens of the grid are concatenated, then the MLP; the LM
    reads N / m^2 image positions."""

    def __init__(self, vision_dim: int, hidden_size: int, merge_size: int = 1, input_norm: bool = False):
        super().__init__()
        self.merge_size = merge_size
        self.norm = nn.LayerNorm(vision_dim) if input_norm else nn.Identity()
        self.fc1 = nn.Linear(vision_dim * merge_size ** 2, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        m, G = self.merge_size, math.isqrt(N)
        x = self.norm(x)  # (B, N, D)
        if m > 1:  # (B, G*G, D) -> (B, (G/m)^2, m*m*D), neighbours side by side
            x = rearrange(x, "b (h m1 w m2) d -> b (h w) (m1 m2 d)", h=G // m, m1=m, m2=m)
        return self.fc2(self.act(self.fc1(x)))  # (B, N / m^2, H)


class GridPositions(nn.Module):
    """Learned 2D positions for the LM's image tokens: a row and a column embedding added to each
    projected token, so every image token's value says where it sits on the grid.

    Why: a rotary LM sees positions only in its attention scores, never in the values it reads
    out, and a 1D sequence index hides the grid's columns; the toy CLIP tokens carry their place
    only in part (notebook 02's probe). Qwen2.5-VL gives image tokens (t, h, w) rotary positions
    (M-RoPE); the toy adds the two embeddings instead, as ViT-style models do. Alone they did not
    teach "is A left of B?"; with position turns they did (scripts/ablate_relation.py, docs/status.md)."""

    def __init__(self, side: int, hidden_size: int, init: str = "random", scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"grid_scale must be > 0, got {scale}")
        if init == "random":
            row, col = torch.randn(side, hidden_size) * 0.02, torch.randn(side, hidden_size) * 0.02
        elif init == "sincos":
            row, col = sincos_grid(side, hidden_size)
        else:
            raise ValueError(f"grid_init must be 'random' or 'sincos', got {init!r}")
        self.row_embed = nn.Parameter(row * scale)  # (G, H)
        self.col_embed = nn.Parameter(col * scale)  # (G, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, G*G, H), row-major grid
        grid = self.row_embed[:, None] + self.col_embed[None, :]  # (G, G, H)
        return x + grid.flatten(0, 1).to(x.dtype)  # (B, G*G, H)


def splice_image_embeds(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                        image_embeds: torch.Tensor) -> torch.Tensor:
    """Put image embeddings at the image placeholder positions, in order (Qwen2.5-VL's
    `inputs_embeds.masked_scatter(image_mask, image_embeds)`)."""
    mask = input_ids == image_token_id  # (B, T)
    if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(f"{int(mask.sum())} image placeholders but {image_embeds.shape[0]} images x "
                         f"{image_embeds.shape[1]} tokens; expand each placeholder to the image's token count")
    return text_embeds.masked_scatter(mask[..., None], image_embeds.to(text_embeds.dtype))  # (B, T, H)


def build_lm(cfg: BackboneConfig, vocab_size: int, pad_token_id: int, eos_token_id: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    lm_config = AutoConfig.for_model(
        cfg.lm_type, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, bos_token_id=None, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(lm_config)


class ToyBackbone(Backbone):
    """CLIP tokens -> Projector -> causal LM. `encoder` (a `ClipEncoder`) is only needed to
    read raw images; training reads cached CLIP features and leaves it out."""

    def __init__(self, cfg: BackboneConfig, tokenizer, encoder=None, lm=None):
        super().__init__()
        self.cfg, self.tokenizer, self.encoder = cfg, tokenizer, encoder
        fmt = chat_format_of(tokenizer)
        self.image_placeholder = fmt.image
        self.image_token_id = tokenizer.convert_tokens_to_ids(fmt.image)
        self.eos_token_id = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
        grid = math.isqrt(cfg.num_image_tokens)
        if grid * grid != cfg.num_image_tokens or grid % cfg.merge_size:
            raise ValueError(f"num_image_tokens {cfg.num_image_tokens} must be a square grid whose side is a "
                             f"multiple of merge_size {cfg.merge_size}")
        self.num_placeholders = cfg.num_image_tokens // cfg.merge_size ** 2  # image positions in the LM
        self.projector = Projector(cfg.vision_dim, cfg.hidden_size, cfg.merge_size, cfg.input_norm)
        self.positions = (GridPositions(grid // cfg.merge_size, cfg.hidden_size, cfg.grid_init,
                                        cfg.grid_scale)
                          if cfg.grid_positions else nn.Identity())
        self.lm = lm if lm is not None else build_lm(cfg, len(tokenizer), tokenizer.pad_token_id,
                                                     self.eos_token_id)
        if encoder is not None:
            encoder.requires_grad_(False).eval()  # frozen, as in LLaVA's main stage

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def image_size(self) -> int:
        return self.encoder.image_size[0] if self.encoder is not None else 64

    # -- the pieces ------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)  # (B, T) -> (B, T, H)

    def run_lm(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        out = self.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # (B, T, H)

    def encode_images(self, images) -> torch.Tensor:
        """Images (uint8 (B, 3, H, W), PIL images or paths) -> CLIP tokens (B, N, D)."""
        if self.encoder is None:
            raise ValueError("this ToyBackbone has no CLIP encoder; build it with encoder=... (or "
                             "load_understanding(run_dir)) to answer from raw images")
        batch = as_image_batch(images, self.image_size)  # (B, 3, S, S) uint8
        # VQA asks several questions per image: encode each distinct image once
        unique, inverse = torch.unique(batch.flatten(1), dim=0, return_inverse=True)  # (U, 3*S*S)
        with torch.no_grad():
            tokens = self.encoder.encode_tokens(unique.view(-1, *batch.shape[1:]).to(self.device))  # (U, N, D)
        return tokens[inverse.to(self.device)]  # (B, N, D)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected CLIP tokens spliced into the image placeholders."""
        embeds = self.embed_text(input_ids)  # (B, T, H)
        if image_features is None:
            return embeds
        image_embeds = self.positions(self.projector(image_features.to(embeds.dtype)))  # (B, N / m^2, H)
        return splice_image_embeds(embeds, input_ids, self.image_token_id, image_embeds)  # (B, T, H)

    def hidden(self, input_ids, image_features, attention_mask, position_ids, run_lm=None) -> torch.Tensor:
        """Last-layer states (B, T, H) of token ids with CLIP tokens (B, N, D) spliced in; the
        mask may be 2D (B, T) padding or 4D (B, 1, T, T) packed (see training.packing). `run_lm`:
        what runs the LM, by default `self.run_lm` (training passes its compiled form)."""
        return (run_lm or self.run_lm)(self.embed(input_ids, image_features), attention_mask, position_ids)

    def prompt_batch(self, questions: list[str], with_image: bool = True) -> dict:
        """Left-padded ids (B, T) + mask of the chat-formatted questions, image placeholders
        expanded to N tokens each."""
        texts = [expand_image_placeholders(generation_prompt(self.tokenizer, q, with_image),
                                           self.image_placeholder, self.num_placeholders)
                 for q in questions]
        enc = self.tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,
                             return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    # -- the Backbone interface ------------------------------------------------------------
    def answer(self, images, questions: list[str], max_new_tokens: int = 32) -> list[str]:
        return self.answer_features(self.encode_images(images), questions, max_new_tokens)

    @torch.no_grad()
    def answer_features(self, image_features: torch.Tensor, questions: list[str],
                        max_new_tokens: int = 32) -> list[str]:
        """Greedy answers (one batch) from CLIP tokens (B, N, D) already computed."""
        out = self.generate_ids(image_features, questions, max_new_tokens)  # (B, new tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(self, image_features: torch.Tensor, questions: list[str],
                     max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy decoding with the KV cache: the new token ids (B, <= max_new_tokens), rows
        that stopped early padded with the pad id after their end-of-turn token."""
        self._check_questions(questions, len(image_features))
        batch = self.prompt_batch(questions)
        embeds = self.embed(batch["input_ids"], image_features.to(self.device))  # (B, T, H)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)

    def hidden_states(self, images, prompts: list[str], positions) -> torch.Tensor:
        with_image = images is not None
        batch = self.prompt_batch(prompts, with_image)
        feats = self.encode_images(images) if with_image else None
        mask = batch["attention_mask"]
        states = self.hidden(batch["input_ids"], feats, mask, positions_from_mask(mask))  # (B, T, H)
        return gather_positions(states, mask, positions)  # (B, K, H)

    # -- save / load: safetensors + transformers config + tokenizer ---------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        weights = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        weights |= {f"positions.{k}": v for k, v in self.positions.state_dict().items()}
        weights |= {f"lm.{k}": v for k, v in self.lm.state_dict().items()
                    if k != "lm_head.weight"}  # tied to the input embedding
        save_tensors(d / WEIGHTS, weights)
        atomic_write_json(d / BACKBONE_CONFIG, asdict(self.cfg))
        atomic_write_json(d / LM_CONFIG, self.lm.config.to_dict())
        self.tokenizer.save_pretrained(str(d / TOKENIZER_DIR))
        return d

    @classmethod
    def load(cls, directory: str | Path, encoder=None) -> "ToyBackbone":
        from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

        d = Path(directory)
        for name in (WEIGHTS, BACKBONE_CONFIG, LM_CONFIG, TOKENIZER_DIR):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d / name} is missing; a ToyBackbone directory holds {WEIGHTS}, "
                                        f"{BACKBONE_CONFIG}, {LM_CONFIG} and {TOKENIZER_DIR}/ (ToyBackbone.save)")
        cfg = BackboneConfig(**json.loads((d / BACKBONE_CONFIG).read_text()))
        lm_dict = json.loads((d / LM_CONFIG).read_text())
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_dict.pop("model_type"), **lm_dict))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(d / TOKENIZER_DIR))
        model = cls(cfg, tokenizer, encoder, lm)
        weights = load_tensors(d / WEIGHTS)
        model.projector.load_state_dict({k[10:]: v for k, v in weights.items() if k.startswith("projector.")})
        model.positions.load_state_dict({k[10:]: v for k, v in weights.items() if k.startswith("positions.")})
        missing, unexpected = model.lm.load_state_dict(
            {k[3:]: v for k, v in weights.items() if k.startswith("lm.")}, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"{d / WEIGHTS} does not match its config: missing {missing}, unexpected {unexpected}")
        model.lm.tie_weights()
        return model.eval()
