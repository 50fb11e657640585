"""The one interface every understanding backbone offers (the toy LM and Qwen2.5-VL alike).

BLIP3-o uses its backbone in two ways, and stage 2 relies on nothing else:
  answer(images, questions)          greedy answers: the backbone's understanding ability
  hidden_states(images, prompts, positions)   last-layer states at chosen token positions
  query_states(prompts, query_embeds)  the generation condition Q: chat prompt + `[IMG]` +
                                     Nq learnable query embeddings through the frozen LM, the
                                     last-layer states at the query positions (the official
                                     code appends the queries after the prompt the same way)
plus `.hidden_size` and `.freeze()` (weights `requires_grad=False` and eval mode, kept in eval
mode even when a parent module calls `.train()`; gradients still reach `query_embeds`).

Images are converted as documented in `load_image`: RGBA is composited on white, other modes
go to RGB, other sizes are resized to the model's size with bicubic resampling.

Shape glossary: B batch, T tokens, Nq query tokens, K read positions, H LM hidden size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .tokenizer import IMG_MARKER, generation_prompt


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) counting real tokens only, so a left-padded row starts at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def gather_positions(states: torch.Tensor, attention_mask: torch.Tensor, positions) -> torch.Tensor:
    """States (B, T, H) of left-padded rows at `positions` (K,) or (B, K) that index each row's
    own unpadded tokens (negative: from the end) -> (B, K, H)."""
    B, T, H = states.shape
    pos = torch.as_tensor(positions, device=states.device).long()
    pos = pos.expand(B, -1) if pos.ndim == 1 else pos  # (B, K)
    lengths = attention_mask.sum(-1, keepdim=True)  # (B, 1)
    if bool(((pos >= lengths) | (pos < -lengths)).any()):
        raise ValueError(f"positions {pos.tolist()} out of range for sequences of length {lengths.squeeze(-1).tolist()}")
    index = torch.where(pos < 0, T + pos, T - lengths + pos)  # (B, K) in the padded row
    return states.gather(1, index[..., None].expand(-1, -1, H))  # (B, K, H)


def load_image(source, size: int | None = 64) -> torch.Tensor:
    """A path or PIL image -> uint8 (3, size, size): RGBA composited on white, grey/palette to
    RGB, other sizes resized with bicubic resampling (`size=None` keeps the size)."""
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"image file {source} not found")
        source = Image.open(source)
    if not isinstance(source, Image.Image):
        raise ValueError(f"expected an image path or PIL image, got {type(source).__name__}")
    img = source
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W)


def as_image_list(images) -> list:
    """uint8 (B, C, H, W) / (C, H, W) tensors (C = 1, 3 or 4), PIL images or paths -> a list of
    PIL images or paths (one per image), for `load_image`."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 (B, 3, H, W), got {images.dtype}; "
                             "multiply [0, 1] floats by 255 and cast with .to(torch.uint8)")
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
            raise ValueError(f"image tensors must be (B, C, H, W) with C in 1, 3, 4, got {tuple(images.shape)}")
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[x.shape[1]]
        return [Image.fromarray(i.permute(1, 2, 0).squeeze(-1).numpy(), mode) for i in x.cpu()]
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images)


def as_image_batch(images, size: int = 64) -> torch.Tensor:
    """Any of `as_image_list`'s inputs -> uint8 (B, 3, size, size), converted by `load_image`."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
            and images.shape[1] == 3 and tuple(images.shape[-2:]) == (size, size):
        return images  # already the model's format
    return torch.stack([load_image(i, size) for i in as_image_list(images)])  # (B, 3, size, size)


class Backbone(nn.Module):
    """Abstract understanding backbone; see the module docstring for the contract."""

    tokenizer = None
    _frozen = False

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_text(torch.zeros(1, 1, dtype=torch.long, device=self.device)).dtype

    # what an implementation provides
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        raise NotImplementedError

    def run_lm(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:  # -> (B, T, H)
        raise NotImplementedError

    def answer(self, images, questions: list[str], max_new_tokens: int = 32) -> list[str]:
        raise NotImplementedError

    def hidden_states(self, images, prompts: list[str], positions) -> torch.Tensor:  # -> (B, K, H)
        raise NotImplementedError

    def format_prompt(self, prompt: str, with_image: bool) -> str:
        return generation_prompt(self.tokenizer, prompt, with_image)

    # shared by every implementation
    def query_states(self, prompts: list[str], query_embeds: torch.Tensor, run_lm=None) -> torch.Tensor:
        """Chat prompt (a generation request) + `[IMG]` + Nq query embeddings -> the last-layer
        states at the query positions (B, Nq, H). Rows are left-padded so the queries of every
        row sit at the end; positions count real tokens only (padded == one by one). `run_lm`:
        what runs the LM, by default `self.run_lm` (stage 2's training passes its compiled form)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string; wrap it in [ ]")
        B = len(prompts)
        if query_embeds.ndim == 2:
            query_embeds = query_embeds[None].expand(B, -1, -1)  # (Nq, H) -> (B, Nq, H)
        if query_embeds.ndim != 3 or query_embeds.shape[0] != B or query_embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"query_embeds must be (Nq, {self.hidden_size}) or ({B}, Nq, {self.hidden_size}), "
                             f"got {tuple(query_embeds.shape)}")
        Nq = query_embeds.shape[1]
        texts = [self.format_prompt(p, with_image=False) + IMG_MARKER for p in prompts]
        enc = self.tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,
                             return_tensors="pt").to(self.device)
        text = self.embed_text(enc["input_ids"])  # (B, T, H)
        embeds = torch.cat([text, query_embeds.to(text.device, text.dtype)], 1)  # (B, T + Nq, H)
        mask = torch.cat([enc["attention_mask"], enc["attention_mask"].new_ones(B, Nq)], 1)  # (B, T + Nq)
        states = (run_lm or self.run_lm)(embeds, mask, positions_from_mask(mask))  # (B, T + Nq, H)
        return states[:, -Nq:]  # (B, Nq, H)

    def freeze(self) -> "Backbone":
        """Weights stay fixed (stage 2): no gradients, eval mode (kept by `.train()`)."""
        self.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(mode and not self._frozen)

    @staticmethod
    def _check_questions(questions, num_images: int) -> None:
        if isinstance(questions, str):
            raise ValueError("questions must be a list of strings, got a single string; wrap it in [ ]")
        if len(questions) != num_images:
            raise ValueError(f"{len(questions)} questions for {num_images} images; pass one question per image")
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise ValueError("the question is empty; ask something about the image, "
                                 "e.g. \"what color is the circle?\"")
