"""Qwen2.5-VL behind the `Backbone` interface: the full run's frozen understanding backbone.

BLIP3-o (8B: Qwen2.5-VL-7B-Instruct, 4B: -3B) never trains this model; it answers questions
with it as is and reads its last-layer states at the 64 query positions for generation. This
wrapper uses the model's own processor and chat template (`<|vision_start|><|image_pad|>...`
placeholders, 3D multimodal RoPE for images) and adds BLIP3-o's `[IMG]` marker to the
tokenizer when the checkpoint lacks it. Prompts without images (`query_states`) only use the
text model, where the three RoPE axes share the 1D positions.

Tested on a tiny random-weight `Qwen2_5_VLForConditionalGeneration` config with a ShapesWorld
tokenizer in Qwen's format (no download); `from_pretrained` loads the real checkpoints.

Shape glossary: B batch, T tokens, K read positions, H LM hidden size.
"""

from __future__ import annotations

import torch

from .backbone_interface import Backbone, as_image_list, gather_positions, load_image, positions_from_mask
from .tokenizer import IMG_MARKER, user_turn


class QwenVLBackbone(Backbone):
    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        if IMG_MARKER not in self.tokenizer.get_vocab():  # BLIP3-o adds its marker token
            self.tokenizer.add_special_tokens({"additional_special_tokens": [IMG_MARKER]})
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))
        self.eos_token_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "bfloat16", min_pixels: int | None = None,
                        max_pixels: int | None = None) -> "QwenVLBackbone":
        """Load e.g. "Qwen/Qwen2.5-VL-7B-Instruct" (or a local copy) with its processor."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        return cls(model, processor).eval()

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T, H)

    def run_lm(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        # text only: 2D positions, which the text model repeats on the 3 mRoPE axes
        out = self.model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # (B, T, H)

    def format_prompt(self, prompt: str, with_image: bool) -> str:
        return self.processor.apply_chat_template(user_turn(prompt, with_image), tokenize=False,
                                                  add_generation_prompt=True)

    def inputs(self, images, prompts: list[str]) -> dict:
        """The processor's left-padded batch: ids, mask, pixel patches, image grids."""
        pil = None
        if images is not None:
            from PIL import Image

            tensors = [load_image(i, size=None) for i in as_image_list(images)]  # RGB uint8 (3, H, W)
            pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in tensors]
            self._check_questions(prompts, len(pil))
        texts = [self.format_prompt(p, pil is not None) for p in prompts]
        batch = self.processor(text=texts, images=pil, return_tensors="pt", padding=True, padding_side="left")
        return batch.to(self.device)

    @torch.no_grad()
    def answer(self, images, questions: list[str], max_new_tokens: int = 32) -> list[str]:
        batch = self.inputs(images, questions)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def hidden_states(self, images, prompts: list[str], positions) -> torch.Tensor:
        batch = self.inputs(images, prompts)
        mask = batch["attention_mask"]
        if images is None:
            states = self.run_lm(self.embed_text(batch["input_ids"]), mask, positions_from_mask(mask))
        else:  # the full model: vision tower, placeholder scatter, 3D RoPE from the image grids
            states = self.model.model(**batch, use_cache=False).last_hidden_state  # (B, T, H)
        return gather_positions(states, mask, positions)  # (B, K, H)


def tiny_qwen_vl(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> QwenVLBackbone:
    """A random-weight Qwen2.5-VL a few hundred KB big, with `tokenizer` (built with
    `build_tokenizer(..., chat_format="qwen2_5_vl")`): the real classes, processor and chat
    template, no download. For tests and for reading the architecture, not for answers."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    ids = {t: tokenizer.convert_tokens_to_ids(t)
           for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    head_dim = hidden_size // 4
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,  # t, h, w axes
                                          "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    # 64 px ShapesWorld images -> 56 x 56 -> a 4 x 4 patch grid -> 2 x 2 = 4 merged image tokens
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=64 * 64),
                                    video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template)
    return QwenVLBackbone(model, processor).eval()
