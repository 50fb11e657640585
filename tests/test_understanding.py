"""Stage 1b: answer-only loss, shared-prefix packing, overfitting, resume, VQA metrics, the
stage end to end (tiny), the Python and CLI `answer` (errors included)."""

import json

import pytest
import torch

from blip3o_mini.backbone import BackboneConfig, ToyBackbone
from blip3o_mini.backbone_interface import Backbone, positions_from_mask
from blip3o_mini.cli import main as cli
from blip3o_mini.data import make_sample
from blip3o_mini.data.dataset import generate_split
from blip3o_mini.data.tensors import images_uint8
from blip3o_mini.evaluation.vqa import vqa_accuracy
from blip3o_mini.tokenizer import build_tokenizer, expand_image_placeholders, shapesworld_texts
from blip3o_mini.training.distributed import TrainerConfig
from blip3o_mini.training.packing import IGNORE, Packer, collate_rows, packed_attention_mask
from blip3o_mini.training.understanding import (UnderstandingModule, UnderstandingTrainConfig, answer_loss,
                                                collate, conversation, train_understanding)

ROWS = [make_sample(0, "train", i) for i in range(40)]
TINY = BackboneConfig(vision_dim=16, hidden_size=64, num_layers=2, intermediate_size=128)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(shapesworld_texts(ROWS))


def tiny_backbone(tok, seed=0):
    torch.manual_seed(seed)
    return ToyBackbone(TINY, tok)


def test_labels_cover_answers_only(tok):
    packer = Packer(tok, 64)
    row = packer.pack_many([conversation(ROWS[0])])[0]
    labelled = [i for i, l in enumerate(row.labels) if l != IGNORE]
    segs = {}
    for i in labelled:
        segs.setdefault(row.segments[i], []).append(row.labels[i])
    answers = [a for _, a in conversation(ROWS[0])]
    assert [tok.decode(v) for _, v in sorted(segs.items())] == [a + "<|end|>" for a in answers]
    assert all(row.labels[i] == row.input_ids[i] for i in labelled)
    assert row.segments[:65] == [0] * 65 and row.positions[:65] == list(range(65))


def test_loss_ignores_non_answer_positions(tok):
    bb = tiny_backbone(tok)
    batch = collate([(torch.randn(64, 16), r) for r in Packer(tok, 64).pack_many(
        [conversation(ROWS[0]), conversation(ROWS[1])])], tok.pad_token_id)
    hidden = bb.hidden(batch["input_ids"], batch["image_features"], packed_attention_mask(batch["segments"]),
                       batch["position_ids"]).detach().requires_grad_(True)
    answer_loss(hidden, batch["labels"], bb.lm.lm_head).backward()
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != IGNORE  # state t predicts token t + 1
    grad_norm = hidden.grad.norm(dim=-1)  # (B, T)
    assert (grad_norm[predicts_answer] > 0).all() and (grad_norm[~predicts_answer] == 0).all()


def test_packed_turns_equal_one_turn_sequences(tok):
    """Turn j of a packed row gives the states of the single-turn chat `prefix + turn j`."""
    bb = tiny_backbone(tok).eval()
    conv = conversation(ROWS[3])
    feats = torch.randn(1, 64, 16)
    row = Packer(tok, 64).pack_many([conv])[0]
    batch = collate_rows([row], tok.pad_token_id)
    packed = bb.hidden(batch["input_ids"], feats, packed_attention_mask(batch["segments"]), batch["position_ids"])[0]
    seg = torch.tensor(row.segments)
    for j, (q, a) in enumerate(conv, start=1):
        text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                                        {"role": "assistant", "content": a}], tokenize=False)
        ids = tok(expand_image_placeholders(text, "<|image|>", 64), add_special_tokens=False, return_tensors="pt").input_ids
        keep = (seg == 0) | (seg == j)
        assert ids[0].tolist() == torch.tensor(row.input_ids)[keep].tolist()  # same tokens as the chat template
        mask = torch.ones_like(ids)
        single = bb.hidden(ids, feats, mask, positions_from_mask(mask))[0]
        torch.testing.assert_close(packed[keep], single, atol=2e-5, rtol=1e-4)


def test_position_turns_follow_the_scene_graph(tok):
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.text import position_turns

    objects = [{"shape": "circle", "color": "red", "bbox": [4, 40, 20, 56]},
               {"shape": "square", "color": "blue", "bbox": [40, 2, 54, 16]},
               {"shape": "square", "color": "blue", "bbox": [40, 30, 54, 44]}]  # two blue squares: not named
    assert position_turns(scene_of({"objects": objects})) == [("where is the red circle?", "left"),
                                                              ("how high is the red circle?", "below")]
    row = ROWS[5]
    plain, placed = conversation(row), conversation(row, positions=True)
    assert placed[:len(plain)] == plain and placed[len(plain):] == position_turns(scene_of(row))
    assert len(tok.tokenize("how high is the red circle?")) > 7  # "high" is not a ShapesWorld word...
    placed_tok = build_tokenizer(shapesworld_texts(ROWS, positions=True))  # ...unless the turns are trained
    assert placed_tok.tokenize("how high is the red circle?")[:2] == ["how", "Ġhigh"]
    with pytest.raises(ValueError, match="position_turns needs each row's scene graph"):
        conversation({k: v for k, v in row.items() if k != "objects"}, positions=True)


def test_relation_turns_ask_every_named_pair_with_true_answers():
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.text import INVERSE, relation_turns
    from blip3o_mini.data.world import relation

    objects = [{"shape": "circle", "color": "red", "bbox": [4, 40, 20, 56]},
               {"shape": "triangle", "color": "green", "bbox": [24, 4, 38, 18]},
               {"shape": "square", "color": "blue", "bbox": [40, 2, 54, 16]},
               {"shape": "square", "color": "blue", "bbox": [40, 30, 54, 44]}]  # two blue squares: not named
    scene = scene_of({"objects": objects})
    red, green = scene.objects[:2]
    true_turns = {(f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?", answer)
                  for a, b in ((red, green), (green, red))
                  for asked, answer in ((relation(a, b), "yes"), (INVERSE[relation(a, b)], "no"))}
    (turn,) = relation_turns(scene)  # one named pair: red circle and green triangle
    assert turn in true_turns
    assert relation_turns(scene) == relation_turns(scene_of({"objects": objects}))  # same turns when rebuilt
    answers = [ans for i in range(200) for _, ans in relation_turns(scene_of(make_sample(0, "train", i)))]
    assert len(answers) > 200 and 0.4 < answers.count("yes") / len(answers) < 0.6  # both answers, balanced
    row = ROWS[5]
    plain, full = conversation(row, positions=True), conversation(row, positions=True, relations=True)
    assert full[:len(plain)] == plain and full[len(plain):] == relation_turns(scene_of(row))
    with pytest.raises(ValueError, match="relation_turns needs each row's scene graph"):
        conversation({k: v for k, v in row.items() if k != "objects"}, relations=True)


def test_direction_turns_name_the_shown_relation_of_every_named_pair_after_the_other_turns():
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.text import direction_turns, relation_turns

    objects = [{"shape": "circle", "color": "red", "bbox": [4, 40, 20, 56]},
               {"shape": "triangle", "color": "green", "bbox": [24, 4, 38, 18]},
               {"shape": "circle", "color": "red", "bbox": [26, 42, 38, 54]},  # two red circles: not named
               {"shape": "square", "color": "blue", "bbox": [26, 22, 38, 34]}]
    scene = scene_of({"objects": objects})
    # green triangle (31, 11) vs blue square (32, 28): only a vertical relation -> above / below
    expected = {("where is the green triangle from the blue square?", "above"),
                ("where is the blue square from the green triangle?", "below")}
    (turn,) = direction_turns(scene)
    assert turn in expected and direction_turns(scene) == direction_turns(scene_of({"objects": objects}))
    answers = [ans for i in range(200) for _, ans in direction_turns(scene_of(make_sample(0, "train", i)))]
    assert len(answers) > 200 and set(answers) == {"left", "right", "above", "below"}
    assert 0.4 < answers.count("left") / (answers.count("left") + answers.count("right")) < 0.6  # both orders
    row = ROWS[5]
    plain = conversation(row, positions=True, relations=True, counts=True)
    full = conversation(row, positions=True, relations=True, counts=True, directions=True)
    assert full[:len(plain)] == plain and full[len(plain):] == direction_turns(scene_of(row))  # last: never read by a relation
    assert len(direction_turns(scene_of(row))) == len(relation_turns(scene_of(row)))  # one per related pair
    assert len(build_tokenizer(shapesworld_texts(ROWS)).tokenize("from")) > 1  # "from" is not a ShapesWorld word...
    assert build_tokenizer(shapesworld_texts(ROWS, directions=True)).tokenize("where is the red circle from")[-1] == "Ġfrom"
    with pytest.raises(ValueError, match="direction_turns needs each row's scene graph"):
        conversation({k: v for k, v in row.items() if k != "objects"}, directions=True)


def test_relation_and_direction_turns_follow_the_datas_relation_rule():
    """`data.relation_rule` reaches the understanding stage's extra turns (`training_turns`), so
    they state the relation the rows' own captions and questions state."""
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.training.understanding import training_turns

    # red circle centre (17, 9), blue square (27, 37): 10 px across, 28 down
    objects = [{"shape": "circle", "color": "red", "bbox": [10, 2, 24, 16]},
               {"shape": "square", "color": "blue", "bbox": [20, 30, 34, 44]}]
    row = {"captions": ["a red circle and a blue square"], "questions": [], "answers": [], "objects": objects}
    cfg = UnderstandingTrainConfig(relation_turns=True, direction_turns=True)
    for rule, words in (("horizontal_first", {"left", "right"}), ("dominant_axis", {"above", "below"})):
        *_, relation_turn, direction_turn = training_turns(cfg, rule)(row)
        assert direction_turn[1] in words, rule
        assert any(f" {w} " in relation_turn[0] for w in words), relation_turn  # asked on the same axis
    assert training_turns(cfg)(row) == training_turns(cfg, "horizontal_first")(row)  # the toy's rule by default
    assert scene_of(row).objects[0].center == (17.0, 9.0)


def test_count_turns_count_every_shape_not_yet_asked():
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.text import count_turns

    objects = [{"shape": "circle", "color": "red", "bbox": [4, 40, 20, 56]},
               {"shape": "circle", "color": "blue", "bbox": [24, 4, 38, 18]},
               {"shape": "square", "color": "blue", "bbox": [40, 2, 54, 16]}]
    scene = scene_of({"objects": objects})
    assert count_turns(scene) == [("how many circles are there?", "two"), ("how many squares are there?", "one"),
                                  ("how many triangles are there?", "zero")]
    assert count_turns(scene, asked=("how many squares are there?",)) == [
        ("how many circles are there?", "two"), ("how many triangles are there?", "zero")]
    row = ROWS[5]
    plain, full = conversation(row, positions=True), conversation(row, positions=True, counts=True)
    added = full[len(plain):]
    assert full[:len(plain)] == plain and added == count_turns(scene_of(row), tuple(row["questions"]))
    asked = [q for q in row["questions"] if q.startswith("how many") and q != "how many objects are there?"]
    assert len(added) == 3 - len(asked) and not {q for q, _ in added} & set(row["questions"])
    with pytest.raises(ValueError, match="count_turns needs each row's scene graph"):
        conversation({k: v for k, v in row.items() if k != "objects"}, counts=True)


def test_type_loss_watches_each_question_type_on_held_out_rows(tok, tmp_path):
    from blip3o_mini.data.text import QUESTION_TYPES
    from blip3o_mini.training.understanding import type_batches

    feats, rows = torch.randn(40, 64, 16), ROWS
    batches = type_batches(feats, rows, Packer(tok, 64), max_rows=6)
    assert set(batches) == set(QUESTION_TYPES)
    relation_rows = [r for r in rows if "relation" in r["question_types"]][:6]
    labels = batches["relation"]["labels"]  # every labelled token is a relation answer or its end of turn
    answers = tok.decode(labels[labels != IGNORE]).replace("<|end|>", " ").split()
    assert len(labels) == len(relation_rows) and answers == [
        a for r in relation_rows for a, t in zip(r["answers"], r["question_types"]) if t == "relation"]

    cfg = UnderstandingTrainConfig(batch_size=4, max_steps=4, warmup_steps=1, checkpoint_every=2, type_loss_every=2)
    trainer = TrainerConfig(accelerator="cpu", precision="32-true")
    bb = tiny_backbone(tok)
    result = train_understanding(bb, feats[:8], rows[:8], cfg, tmp_path, trainer=trainer, held_out=(feats, rows))
    curves = result.curves["type_loss"]
    assert set(curves) == set(QUESTION_TYPES) and all([s for s, _ in c] == [0, 2, 3] for c in curves.values())
    module = UnderstandingModule(bb, cfg, type_batches(feats, rows, Packer(tok, 64)))
    assert module.type_losses()["relation"] == pytest.approx(curves["relation"][-1][1], rel=0.2)  # trained model
    cfg.max_steps = 6  # resumed: the history continues from the checkpoint's
    again = train_understanding(tiny_backbone(tok), feats[:8], rows[:8], cfg, tmp_path, trainer=trainer,
                                held_out=(feats, rows))
    assert [s for s, _ in again.curves["type_loss"]["count"]] == [0, 2, 3, 4, 5]  # 3: the first run's last step
    assert train_understanding(tiny_backbone(tok), feats[:8], rows[:8], cfg, tmp_path / "off", trainer=trainer
                               ).curves == {}


def test_overfits_one_batch(tok):
    torch.manual_seed(0)
    bb = ToyBackbone(BackboneConfig(vision_dim=16, hidden_size=64, num_layers=2, intermediate_size=128,
                                    num_image_tokens=4), tok)  # 4 image tokens: a short row
    rows = ROWS[:2]
    feats = torch.randn(2, 4, 16)
    batch = collate(list(zip(feats, Packer(tok, 4).pack_many([conversation(r) for r in rows]))), tok.pad_token_id)
    module = UnderstandingModule(bb, UnderstandingTrainConfig())
    opt = torch.optim.AdamW(bb.parameters(), lr=5e-3)
    bb.train()
    for _ in range(50):
        loss = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    bb.eval()
    for i, r in enumerate(rows):
        qs = ["describe the image."] + r["questions"]
        assert bb.answer_features(feats[i:i + 1].expand(len(qs), -1, -1), qs, 30) == [r["captions"][0]] + r["answers"]


def test_training_resumes_from_last_checkpoint(tok, tmp_path):
    feats, rows = torch.randn(8, 64, 16), ROWS[:8]
    cfg = UnderstandingTrainConfig(batch_size=4, max_steps=2, warmup_steps=1, log_every=1, checkpoint_every=2)
    trainer = TrainerConfig(accelerator="cpu", precision="32-true")  # a config's trainer: section
    first = train_understanding(tiny_backbone(tok), feats, rows, cfg, tmp_path, trainer=trainer)
    assert first.steps == 2 and (tmp_path / "last.ckpt").exists() and first.resumed_from is None
    cfg.max_steps = 4
    again = train_understanding(tiny_backbone(tok, seed=1), feats, rows, cfg, tmp_path, trainer=trainer)
    assert again.resumed_from == 2 and again.steps == 4
    assert [s for s, _ in again.loss_history] == [0, 1, 2, 3]
    assert again.loss_history[:2] == first.loss_history  # the history travels in the checkpoint



def test_muon_takes_the_lm_layers_matrices_and_resumes(tok, tmp_path):
    """`optimizer: muon`: the decoder layers' matrices step with Muon (with the recipe's weight
    decay), embeddings, head, norms and projector with AdamW; a resumed run restores Muon's
    momentum from the checkpoint."""
    from blip3o_mini.training.muon import MuonAdamW, hidden_matrices

    bb = tiny_backbone(tok)
    cfg = UnderstandingTrainConfig(batch_size=4, max_steps=2, warmup_steps=1, log_every=1, checkpoint_every=2,
                                   optimizer="muon")
    opt = UnderstandingModule(bb, cfg).configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonAdamW)
    decay, no_decay, muon = opt.param_groups
    assert muon["muon"] and muon["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in muon["params"]} == {id(p) for p in hidden_matrices(bb.lm.model.layers)}
    embeddings = bb.lm.get_input_embeddings().weight
    assert any(p is embeddings for p in no_decay["params"] + decay["params"])  # AdamW's
    feats, rows = torch.randn(8, 64, 16), ROWS[:8]
    trainer = TrainerConfig(accelerator="cpu", precision="32-true")
    train_understanding(bb, feats, rows, cfg, tmp_path, trainer=trainer)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert any("momentum_buffer" in state for state in saved["state"].values())  # Muon's state is checkpointed
    cfg.max_steps = 4
    again = train_understanding(tiny_backbone(tok, seed=1), feats, rows, cfg, tmp_path, trainer=trainer)
    assert again.resumed_from == 2 and again.steps == 4
    with pytest.raises(ValueError, match="understanding.train.optimizer must be adamw or muon, got 'adam'"):
        UnderstandingTrainConfig(optimizer="adam")

class Oracle(Backbone):
    """Answers from the scene graph (looked up by image) or always `fixed`."""

    def __init__(self, split, images, fixed=None):
        super().__init__()
        self.lookup = {images[i].numpy().tobytes(): split[i] for i in range(len(split))}
        self.fixed, self.param = fixed, torch.nn.Parameter(torch.zeros(1))

    def answer(self, images, questions, max_new_tokens=32):
        out = []
        for img, q in zip(images, questions):
            row = self.lookup[img.numpy().tobytes()]
            truth = row["captions"][0] if q == "describe the image." else row["answers"][row["questions"].index(q)]
            out.append(self.fixed or truth.upper() + ".")  # case and full stop do not matter
        return out


def test_vqa_metrics_exact():
    split = generate_split(0, "val", 30)
    images = images_uint8(split)
    perfect = vqa_accuracy(Oracle(split, images), split, images, batch_size=7, captions=True)
    assert perfect.vqa_accuracy == 1.0 and perfect.vqa_accuracy_unseen == 1.0
    assert perfect.caption_accuracy == 1.0 and set(perfect.per_num_objects) <= {1, 2, 3, 4}
    assert perfect.num_questions + perfect.num_questions_unseen == sum(len(q) for q in split["questions"])
    yes = vqa_accuracy(Oracle(split, images, fixed="yes"), split, images, captions=True)
    seen = [a for a, u in zip(split["answers"], split["unseen"]) if not u]
    assert yes.vqa_accuracy == pytest.approx(sum(x == "yes" for a in seen for x in a) / sum(map(len, seen)))
    assert yes.per_type["color"] == 0.0 and yes.caption_accuracy == 0.0
    m = yes.to_metrics()
    for key in ("vqa_accuracy", "vqa_accuracy_unseen", "vqa_accuracy_color", "vqa_accuracy_relation",
                "caption_accuracy"):
        assert key in m


def tiny_run_config():
    return {"seed": 0, "data": {"num_train": 48, "num_val": 64},  # the CLIP stage's recall@1 needs 64
            "clip": {"train": {"batch_size": 16, "max_steps": 2, "precision": "32-true"}},
            "understanding": {"backbone": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                           "intermediate_size": 64},
                              "train": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "precision": "32-true",
                                        "type_loss_every": 2},
                              "eval": {"batch_size": 64, "max_scenes": 12}}}


@pytest.mark.slow
def test_stage_end_to_end_and_answer(tmp_path, capsys):
    from PIL import Image

    from blip3o_mini.run import ensure_stage
    from blip3o_mini.understanding_stage import answer, evaluate_stage_vqa, load_understanding

    results = ensure_stage("understanding", tiny_run_config(), tmp_path)
    und = results["understanding"]
    metrics = json.loads((und.path / "metrics.json").read_text())
    for key in ("vqa_accuracy", "vqa_accuracy_unseen", "vqa_accuracy_count", "caption_accuracy", "train_steps"):
        assert key in metrics
    assert metrics["train_steps"] == 3 and len(json.loads((und.path / "loss_history.json").read_text())) >= 1
    assert not list(und.path.glob("lightning-*"))  # resume state removed once complete
    type_loss = json.loads((und.path / "type_loss_history.json").read_text())  # val questions, steps 0 and 2
    assert [step for step, _ in type_loss["relation"]] == [0, 2] and len(type_loss) == 5
    assert ensure_stage("understanding", tiny_run_config(), tmp_path)["understanding"].skipped
    other = tiny_run_config()  # understanding.train.seed draws another start: its step-0 losses differ
    other["understanding"]["train"]["seed"] = 1
    (tmp_path / "seed1").mkdir()
    for stage in ("data", "clip"):
        (tmp_path / "seed1" / stage).symlink_to(tmp_path / stage)
    again = json.loads((ensure_stage("understanding", other, tmp_path / "seed1")["understanding"].path
                        / "type_loss_history.json").read_text())
    assert again["color"][0][1] != pytest.approx(type_loss["color"][0][1], abs=1e-4)
    backbone = load_understanding(tmp_path)
    assert evaluate_stage_vqa(backbone, tmp_path) == pytest.approx(metrics["vqa_accuracy"])

    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((220, 30, 30, 255), (20, 20, 60, 60))
    rgba.save(tmp_path / "x.png")
    expected = answer(tmp_path / "x.png", "how many objects are there?", backbone=backbone)
    capsys.readouterr()
    assert cli(["answer", str(tmp_path / "x.png"), "how many objects are there?", "--run-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_cli_errors(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "w.png")
    assert cli(["answer", str(tmp_path / "w.png"), "   ", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "question is empty" in err and len(err.strip().splitlines()) == 1
    assert cli(["answer", str(tmp_path / "missing.png"), "what?", "--run-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli(["answer", str(tmp_path / "w.png"), "what?", "--run-dir", str(tmp_path)]) == 2
    assert "no finished understanding stage" in capsys.readouterr().err
    from blip3o_mini.understanding_stage import answer
    with pytest.raises(ValueError, match="question is empty"):
        answer(tmp_path / "w.png", "")


def test_bench_understanding_step_counts_its_arithmetic(monkeypatch):
    """benchmarks/bench_understanding_step.py times the recipe's step and counts the FLOPs of its
    matrix products (benchmarks/matmul_profile.py), exactly on a known product."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_understanding_step
    from matmul_profile import matmul_profile

    a, b = torch.randn(1000, 500), torch.randn(500, 300)
    known = matmul_profile([lambda: a @ b, lambda: torch.bmm(a[None], b[None]), lambda: (a * 2).sum()])
    assert known["matmul_gflop_per_step"] == 0.2  # 2 x 1000 x 500 x 300 twice, over three steps
    assert 0 < known["matmul_share"] < 1  # the third step's elementwise work is not a product
    out = bench_understanding_step.main(["--batches", "1", "--rounds", "1"])
    assert out["eager_step_s"] > 0 and 0 < out["matmul_share"] <= 1 and out["matmul_gflop_per_step"] > 0
