"""The ShapesWorld tokenizer: round trips, one token per word, special tokens, chat template."""

import pytest
from transformers import PreTrainedTokenizerFast

from blip3o_mini.data import make_sample
from blip3o_mini.tokenizer import (CAPTION_PROMPT, FORMATS, IMG_MARKER, build_tokenizer, chat_format_of,
                                   expand_image_placeholders, generation_prompt, shapesworld_texts,
                                   special_tokens, user_turn)

ROWS = [make_sample(0, "train", i) for i in range(200)]
VAL = [make_sample(0, "val", i) for i in range(50)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(shapesworld_texts(ROWS))


def test_round_trip_exact(tok):
    texts = list(shapesworld_texts(VAL)) + ["Is the PURPLE triangle left of 3 squares?", "héllo  wörld\t!", ""]
    for t in texts:
        assert tok.decode(tok(t, add_special_tokens=False).input_ids) == t


def test_every_word_is_one_token(tok):
    for t in shapesworld_texts(VAL):  # val scenes: held-out compositions too
        words = t.replace("?", " ?").replace(",", " ,").replace(".", " .").split()
        ids = tok(t, add_special_tokens=False).input_ids
        assert len(ids) == len(words), (t, tok.convert_ids_to_tokens(ids))
    assert tok.unk_token_id is None  # byte-level: nothing is ever unknown
    assert len(tok) < 600


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_special_tokens_are_single_ids(name):
    t = build_tokenizer(shapesworld_texts(ROWS[:20]), name)
    fmt = FORMATS[name]
    ids = [t.convert_tokens_to_ids(s) for s in special_tokens(fmt)]
    assert len(set(ids)) == len(ids) and t.unk_token_id not in ids
    for s, i in zip(special_tokens(fmt), ids):
        assert t(s, add_special_tokens=False).input_ids == [i]
    assert t.pad_token == fmt.pad and t.eos_token == fmt.end_of_turn
    assert IMG_MARKER in special_tokens(fmt)


def test_toy_chat_template(tok):
    conv = user_turn("what color is the circle?") + [{"role": "assistant", "content": "red"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text == "<|user|><|image|>what color is the circle?<|end|><|assistant|>red<|end|>"
    prompt = generation_prompt(tok, "what color is the circle?")
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>")
    assert generation_prompt(tok, CAPTION_PROMPT, with_image=False) == "<|user|>describe the image.<|end|><|assistant|>"
    ids = tok(expand_image_placeholders(prompt, "<|image|>", 64), add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|image|>")) == 64 and len(ids) == 64 + 9


def test_qwen_chat_template_is_chatml():
    t = build_tokenizer(shapesworld_texts(ROWS[:20]), "qwen2_5_vl")
    assert generation_prompt(t, "how many objects are there?") == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>how many objects are there?"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert chat_format_of(t).name == "qwen2_5_vl"


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    again = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template and chat_format_of(again).name == "toy"
    assert again.padding_side == "left" and again.pad_token == "<|pad|>"
    prompt = generation_prompt(again, "is there a red square?")
    assert again(prompt).input_ids == tok(prompt).input_ids


def test_deterministic():
    a = build_tokenizer(shapesworld_texts(ROWS[:50]))
    b = build_tokenizer(shapesworld_texts(ROWS[:50]))
    assert a.get_vocab() == b.get_vocab()


def test_unknown_format():
    with pytest.raises(ValueError, match="chat_format"):
        build_tokenizer(["a"], "llama")
