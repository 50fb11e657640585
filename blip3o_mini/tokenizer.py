"""The understanding backbone's tokenizer: a small byte-level BPE trained offline on ShapesWorld
text with `tokenizers`, wrapped as a `transformers.PreTrainedTokenizerFast` with a chat template.

BLIP3-o inherits Qwen2.5-VL's tokenizer (byte-level BPE, ChatML template, `<|image_pad|>`
placeholders that the processor repeats once per image token) and adds its own generation
marker. The toy tokenizer is the same kind of object at ShapesWorld scale: every word of the
captions, questions and answers becomes one token, byte-level so any string still round-trips.

Two chat formats share one builder:
  toy         compact role tokens: `<|user|><|image|>what color is the circle?<|end|><|assistant|>`
              (a short template keeps the packed training rows short on a CPU)
  qwen2_5_vl  Qwen2.5-VL's ChatML format and special tokens, so the tiny random-weight
              `Qwen2_5_VLForConditionalGeneration` of the tests runs without a download.
In both, one image placeholder in the text is repeated to the image's token count before
tokenisation (`expand_image_placeholders`), as Qwen2.5-VL's processor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .data.dataset import scene_of
from .data.text import direction_turns, position_turns
from .data.world import DEFAULT_RELATION_RULE

IMG_MARKER = "[IMG]"  # BLIP3-o: what follows this marker is the image to generate (stage 2)
CAPTION_PROMPT = "describe the image."  # captioning is VQA with this question (LLaVA style)

TOY_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|image|>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# Qwen2.5-VL-Instruct's ChatML template, without its default system prompt and video branch.
QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ChatFormat:
    """The special tokens and chat template of one model family."""

    name: str
    pad: str
    end_of_turn: str
    image: str  # placeholder, repeated once per image token
    roles: tuple[str, ...]  # extra tokens for the chat roles / turn openers
    extra: tuple[str, ...]  # other special tokens the family's models expect
    template: str


FORMATS = {
    "toy": ChatFormat("toy", "<|pad|>", "<|end|>", "<|image|>",
                      ("<|system|>", "<|user|>", "<|assistant|>"), (IMG_MARKER,), TOY_TEMPLATE),
    "qwen2_5_vl": ChatFormat("qwen2_5_vl", "<|endoftext|>", "<|im_end|>", "<|image_pad|>",
                             ("<|im_start|>",), ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                                                 IMG_MARKER), QWEN_TEMPLATE),
}


def special_tokens(fmt: ChatFormat) -> list[str]:
    return [fmt.pad, fmt.end_of_turn, fmt.image, *fmt.roles, *fmt.extra]


def shapesworld_texts(rows: Iterable[dict], positions: bool = False, directions: bool = False,
                      rule: str = DEFAULT_RELATION_RULE) -> Iterable[str]:
    """Every caption, question and answer of dataset rows (+ the fixed prompts and role names),
    with `positions` also their position turns (`data.text.position_turns`) and with
    `directions` their direction turns (`data.text.direction_turns`, relations by `rule`; both
    need rows' `objects`)."""
    yield CAPTION_PROMPT
    yield "system user assistant"
    for row in rows:
        yield from row["captions"]
        yield from row["questions"]
        yield from row["answers"]
        if positions:
            yield from (text for turn in position_turns(scene_of(row)) for text in turn)
        if directions:
            yield from (text for turn in direction_turns(scene_of(row), rule) for text in turn)


def build_tokenizer(texts: Iterable[str], chat_format: str = "toy",
                    vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it with the format's special tokens and
    chat template. On ShapesWorld's small vocabulary the merges run out well before
    `vocab_size`, so every word ends up a single token (about 400 tokens in all)."""
    if chat_format not in FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; choose one of {sorted(FORMATS)}")
    fmt = FORMATS[chat_format]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(fmt),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=fmt.pad, eos_token=fmt.end_of_turn,
                                  additional_special_tokens=[t for t in special_tokens(fmt)
                                                             if t not in (fmt.pad, fmt.end_of_turn)],
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = fmt.template
    tok.init_kwargs["chat_format"] = fmt.name  # saved in tokenizer_config.json
    return tok


def chat_format_of(tokenizer) -> ChatFormat:
    """The format a tokenizer was built with (Qwen2.5-VL's when it has `<|image_pad|>`)."""
    name = tokenizer.init_kwargs.get("chat_format")
    if name is None:
        name = "qwen2_5_vl" if "<|image_pad|>" in tokenizer.get_vocab() else "toy"
    return FORMATS[name]


def user_turn(question: str, with_image: bool = True) -> list[dict]:
    """A one-turn conversation in the HF multimodal message format (image first, as LLaVA)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def generation_prompt(tokenizer, question: str, with_image: bool = True) -> str:
    """The chat-formatted text of a question, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(user_turn(question, with_image), tokenize=False,
                                         add_generation_prompt=True)


def expand_image_placeholders(text: str, placeholder: str, num_tokens: int) -> str:
    """Repeat each image placeholder `num_tokens` times (one position per image token)."""
    return text.replace(placeholder, placeholder * num_tokens)
