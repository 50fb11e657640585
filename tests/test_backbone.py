"""The shared backbone interface on the toy LM and on a tiny random-weight Qwen2.5-VL (no
download): answers, hidden states at positions, query states (padding, gradients), freezing,
placeholder splicing, image conversion and the toy checkpoint round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_mini.backbone import BackboneConfig, ToyBackbone
from blip3o_mini.backbone_interface import as_image_batch, load_image
from blip3o_mini.data import make_sample
from blip3o_mini.qwen_vl import tiny_qwen_vl
from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts

ROWS = [make_sample(0, "train", i) for i in range(60)]
TINY = BackboneConfig(vision_dim=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128)
PROMPTS = ["a red circle", "two blue squares and a photo of a green triangle to the left of a square", "three"]
QUESTIONS = ["what color is the circle?", "is there an orange square?", "describe the image."]


class FakeEncoder(torch.nn.Module):
    """A CLIP stand-in with ClipEncoder's image API: mean colour of 8x8 patches -> (B, 64, D)."""

    image_size = (64, 64)

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)

    def encode_tokens(self, images):
        x = images.float() / 255  # (B, 3, 64, 64)
        patches = torch.nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2)  # (B, 64, 3)
        return self.proj(patches)  # (B, 64, D)


def images(n=3):
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.data.dataset import generate_split

    return images_uint8(generate_split(0, "val", n))  # (n, 3, 64, 64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyBackbone(TINY, build_tokenizer(shapesworld_texts(ROWS)), FakeEncoder(TINY.vision_dim)).eval()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_vl(build_tokenizer(shapesworld_texts(ROWS), "qwen2_5_vl"))


@pytest.fixture(params=["toy", "qwen"])
def backbone(request, toy, qwen):
    return {"toy": toy, "qwen": qwen}[request.param]


def lm_head(bb):
    return bb.lm.lm_head if isinstance(bb, ToyBackbone) else bb.model.lm_head


def test_answer_batched_equals_one_by_one(backbone):
    imgs = images()
    batched = backbone.answer(imgs, QUESTIONS, max_new_tokens=6)
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert batched == [backbone.answer(imgs[i:i + 1], [q], max_new_tokens=6)[0] for i, q in enumerate(QUESTIONS)]


def test_hidden_states_padding_and_next_token(backbone):
    imgs = images()
    states = backbone.hidden_states(imgs, QUESTIONS, positions=[0, 5, -1])  # (B, K, H)
    assert states.shape == (3, 3, backbone.hidden_size)
    for i, q in enumerate(QUESTIONS):
        torch.testing.assert_close(states[i], backbone.hidden_states(imgs[i:i + 1], [q], [0, 5, -1])[0],
                                   atol=1e-5, rtol=1e-4)
    # the state at the last prompt position is what greedy decoding reads its first token from
    first = lm_head(backbone)(states[:, -1]).argmax(-1)  # (B,)
    if isinstance(backbone, ToyBackbone):
        generated = backbone.generate_ids(backbone.encode_images(imgs), QUESTIONS, max_new_tokens=1)[:, 0]
    else:
        batch = backbone.inputs(imgs, QUESTIONS)
        generated = backbone.model.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1]
    assert first.tolist() == generated.tolist()
    text_only = backbone.hidden_states(None, PROMPTS, positions=[-1])
    assert text_only.shape == (3, 1, backbone.hidden_size)
    with pytest.raises(ValueError, match="out of range"):
        backbone.hidden_states(None, PROMPTS, positions=[500])


def test_query_states_padded_equals_one_by_one(backbone):
    torch.manual_seed(1)
    queries = torch.randn(5, backbone.hidden_size)
    batched = backbone.query_states(PROMPTS, queries)  # (B, Nq, H)
    assert batched.shape == (3, 5, backbone.hidden_size)
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(batched[i], backbone.query_states([p], queries)[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # the prompt matters
    per_row = torch.randn(3, 5, backbone.hidden_size)  # (B, Nq, H) queries work too
    assert backbone.query_states(PROMPTS, per_row).shape == (3, 5, backbone.hidden_size)
    with pytest.raises(ValueError, match="query_embeds"):
        backbone.query_states(PROMPTS, torch.randn(5, backbone.hidden_size + 1))


def test_query_states_gradient_reaches_queries_only(backbone):
    backbone.freeze()
    backbone.train()  # a parent module switching to train mode must not unfreeze it
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    queries = torch.randn(4, backbone.hidden_size, requires_grad=True)
    backbone.query_states(PROMPTS, queries).square().mean().backward()
    assert queries.grad is not None and torch.isfinite(queries.grad).all() and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_empty_question_is_an_error(backbone):
    with pytest.raises(ValueError, match="question is empty"):
        backbone.answer(images(1), ["  "])
    with pytest.raises(ValueError, match="one question per image"):
        backbone.answer(images(2), ["what?"])


def test_image_placeholders_receive_projected_clip_tokens(toy):
    feats = torch.randn(2, 64, TINY.vision_dim)
    batch = toy.prompt_batch(QUESTIONS[:2])
    embeds = toy.embed(batch["input_ids"], feats)  # (B, T, H)
    is_image = batch["input_ids"] == toy.image_token_id
    assert is_image.sum(1).tolist() == [64, 64]
    torch.testing.assert_close(embeds[is_image].view(2, 64, -1), toy.projector(feats))
    torch.testing.assert_close(embeds[~is_image], toy.embed_text(batch["input_ids"])[~is_image])
    with pytest.raises(ValueError, match="placeholders"):
        toy.embed(batch["input_ids"], feats[:, :32])


def test_toy_checkpoint_round_trip(toy, tmp_path):
    toy.save(tmp_path / "bb")
    names = sorted(p.name for p in (tmp_path / "bb").iterdir())
    assert names == ["backbone_config.json", "lm_config.json", "model.safetensors", "tokenizer"]
    assert not list((tmp_path / "bb").rglob("*.bin")) and not list((tmp_path / "bb").rglob("*.pt"))
    again = ToyBackbone.load(tmp_path / "bb", encoder=toy.encoder)
    assert again.lm.lm_head.weight.data_ptr() == again.lm.get_input_embeddings().weight.data_ptr()  # tied
    imgs = images()
    torch.testing.assert_close(again.hidden_states(imgs, QUESTIONS, [-1]), toy.hidden_states(imgs, QUESTIONS, [-1]))
    assert again.answer(imgs, QUESTIONS, 6) == toy.answer(imgs, QUESTIONS, 6)
    (tmp_path / "bb" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ToyBackbone.load(tmp_path / "bb")


def test_image_conversion(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (220, 30, 30, 0))  # fully transparent red
    rgba.paste((30, 70, 220, 255), (0, 0, 16, 32))  # opaque blue left half
    x = load_image(rgba, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert x[:, 32, 5].tolist() == [30, 70, 220] and x[:, 32, 60].tolist() == [255, 255, 255]
    grey = Image.new("L", (100, 80), 128)
    assert load_image(grey, 64)[:, 10, 10].tolist() == [128, 128, 128]
    path = tmp_path / "g.png"
    grey.save(path)
    assert as_image_batch([path, rgba], 64).shape == (2, 3, 64, 64)
    ref = torch.from_numpy(np.array(grey.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)))
    assert torch.equal(load_image(path, 64), ref.permute(2, 0, 1))
    assert as_image_batch(torch.zeros(2, 4, 48, 48, dtype=torch.uint8), 64).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        as_image_batch(torch.zeros(1, 3, 64, 64), 64)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_patch_merger_concatenates_2x2_neighbours():
    from blip3o_mini.backbone import Projector

    torch.manual_seed(0)
    proj = Projector(vision_dim=3, hidden_size=8, merge_size=2)
    x = torch.randn(2, 64, 3)  # an 8x8 grid of 3-dim tokens, row-major
    grid = x.view(2, 8, 8, 3)
    r, c = 1, 2  # merged token (1, 2) holds grid rows 2-3, columns 4-5
    merged = torch.cat([grid[:, 2, 4], grid[:, 2, 5], grid[:, 3, 4], grid[:, 3, 5]], -1)  # (2, 12)
    expected = proj.fc2(proj.act(proj.fc1(merged)))
    torch.testing.assert_close(proj(x)[:, r * 4 + c], expected)
    assert proj(x).shape == (2, 16, 8)
    tok = build_tokenizer(shapesworld_texts(ROWS))
    bb = ToyBackbone(BackboneConfig(vision_dim=3, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, merge_size=2), tok).eval()
    batch = bb.prompt_batch(["what color is the circle?"])
    assert int((batch["input_ids"] == bb.image_token_id).sum()) == 16
    assert len(bb.answer_features(x, ["what?", "how many?"], 3)) == 2
    with pytest.raises(ValueError, match="merge_size"):
        ToyBackbone(BackboneConfig(vision_dim=3, merge_size=3), tok)


def test_grid_positions_add_a_row_and_a_column_embedding(tmp_path):
    tok = build_tokenizer(shapesworld_texts(ROWS))
    torch.manual_seed(0)
    cfg = BackboneConfig(vision_dim=3, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, grid_positions=True)
    bb = ToyBackbone(cfg, tok).eval()
    x = torch.randn(2, 64, 3)  # an 8x8 grid, row-major
    batch = bb.prompt_batch(["what color is the circle?", "is the red circle left of the square?"])
    image = bb.embed(batch["input_ids"], x)[batch["input_ids"] == bb.image_token_id].view(2, 64, -1)
    r, c = 5, 2  # token 5 * 8 + 2 sits on row 5, column 2
    pos = bb.positions
    torch.testing.assert_close(image[:, r * 8 + c], bb.projector(x)[:, r * 8 + c] + pos.row_embed[r] + pos.col_embed[c])
    assert not torch.allclose(image[:, 0] - bb.projector(x)[:, 0], image[:, 1] - bb.projector(x)[:, 1])
    bb.save(tmp_path / "bb")  # the embeddings travel with the weights
    again = ToyBackbone.load(tmp_path / "bb")
    torch.testing.assert_close(again.positions.row_embed, pos.row_embed)
    assert again.answer_features(x, ["what?", "how many?"], 3) == bb.answer_features(x, ["what?", "how many?"], 3)
    merged = ToyBackbone(BackboneConfig(**(vars(cfg) | {"merge_size": 2})), tok)  # a 4x4 grid after 2x2 merging
    assert merged.positions.row_embed.shape == (4, 32)
    sincos = ToyBackbone(BackboneConfig(**(vars(cfg) | {"grid_init": "sincos"})), tok).positions
    row, col = sincos.row_embed.detach(), sincos.col_embed.detach()  # (8, 32): rows in dims :16, columns in 16:
    assert not row[:, 16:].any() and not col[:, :16].any() and torch.equal(row[:, :16], col[:, 16:])
    torch.testing.assert_close(row[3, :16], torch.cat([torch.sin(3 * 1e4 ** -(torch.arange(8) / 8)),
                                                       torch.cos(3 * 1e4 ** -(torch.arange(8) / 8))]))
    assert (row[1:, 7] > row[:-1, 7]).all()  # the lowest frequency's sine rises along the rows
    quiet = ToyBackbone(BackboneConfig(**(vars(cfg) | {"grid_init": "sincos", "grid_scale": 0.25})), tok).positions
    torch.testing.assert_close(quiet.row_embed.detach(), 0.25 * row)  # the same table, a quarter as loud
    torch.testing.assert_close(quiet.col_embed.detach(), 0.25 * col)
    with pytest.raises(ValueError, match="grid_scale must be > 0"):
        ToyBackbone(BackboneConfig(**(vars(cfg) | {"grid_scale": 0.0})), tok)
    with pytest.raises(ValueError, match="grid_init must be 'random' or 'sincos'"):
        ToyBackbone(BackboneConfig(**(vars(cfg) | {"grid_init": "learned"})), tok)
    assert not hasattr(ToyBackbone(BackboneConfig(vision_dim=3, hidden_size=32, num_layers=1, num_heads=2,
                                                  num_kv_heads=1, intermediate_size=64), tok).positions, "row_embed")
