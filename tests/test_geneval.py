"""GenEval-mini: prompt metadata (committed file = code), the detector on ShapesWorld renders,
GenEval's scoring rule, the folder layout, the CLI, and the calibration of the whole evaluator."""

import json
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from blip3o_mini.cli import main as cli_main
from blip3o_mini.data import make_sample, parse_caption, render, scene_of
from blip3o_mini.data.text import captions
from blip3o_mini.data.world import HELD_OUT, PALETTE, Obj, Scene, relation
from blip3o_mini.evaluation import (MISS_KINDS, TAGS, Detection, add_noise, calibrate, detect,
                                    drawn_relation, drawn_shape, evaluate, gaussian_blur,
                                    make_prompts, miss_kind, prompt_from_scene, read_prompts,
                                    reference_images, reference_scene, relation_verdict,
                                    relative_position, same_objects, score_folder, write_geneval_folder)
from blip3o_mini.evaluation.detector import label_components
from blip3o_mini.evaluation.prompts import DEFAULT_PROMPTS_FILE
from blip3o_mini.evaluation.score import score_images, summarize

PROMPTS = make_prompts()
VAL = [scene_of(make_sample(0, "val", i)) for i in range(200)]


# ---------------------------------------------------------------- prompts
def test_committed_prompts_equal_generated(tmp_path):
    assert read_prompts(DEFAULT_PROMPTS_FILE) == PROMPTS
    assert cli_main(["geneval", "prompts", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").read_bytes() == DEFAULT_PROMPTS_FILE.read_bytes()


def test_prompts_cover_six_tags_in_geneval_format():
    tags = Counter(m["tag"] for m in PROMPTS)
    assert set(tags) == set(TAGS) and min(tags.values()) >= 40
    for m in PROMPTS:
        assert m["prompt"].startswith("a photo of ")
        include = m["include"]
        # the text names exactly the included objects (read back with the caption parser)
        want = Counter({(e.get("color"), e["class"]): e["count"] for e in include})
        assert parse_caption(m["prompt"]) == want, m["prompt"]
        assert m["unseen"] == any((e.get("color"), e["class"]) in HELD_OUT for e in include)
        totals = Counter()
        for e in include:
            totals[e["class"]] += e["count"]
        assert m["exclude"] == [{"class": c, "count": n + 1} for c, n in totals.items()]
    counting = [m["include"][0]["count"] for m in PROMPTS if m["tag"] == "counting"]
    assert set(counting) == {2, 3, 4}
    pos = [m for m in PROMPTS if m["tag"] == "position"]
    assert {m["include"][1]["position"][0] for m in pos} == {"left of", "right of", "above", "below"}
    assert all(m["include"][1]["position"][1] == 0 and f" {m['include'][1]['position'][0]} " in m["prompt"]
               for m in pos)
    for tag in ("colors", "position", "color_attr"):  # both kinds present where colours are named
        assert {m["unseen"] for m in PROMPTS if m["tag"] == tag} == {False, True}
    assert "a photo of an orange square" in {m["prompt"] for m in PROMPTS}
    assert len({m["prompt"] for m in PROMPTS if m["tag"] == "color_attr"}) == 54  # distinct


def test_prompt_seed_changes_sampled_tags_only():
    other = make_prompts(seed=1)
    for tag in TAGS:
        same = [m for m in PROMPTS if m["tag"] == tag] == [m for m in other if m["tag"] == tag]
        assert same == (tag not in ("position", "color_attr"))
    with pytest.raises(ValueError, match="per_tag"):
        make_prompts(per_tag=0)


def test_read_prompts_names_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tag": "colors", "prompt": "x", "include": [
        {"class": "circle", "count": 1, "color": "pink"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: color 'pink'"):
        read_prompts(bad)
    bad.write_text(json.dumps({"tag": "position", "prompt": "x", "include": [
        {"class": "circle", "count": 1, "position": ["left of", 0]}]}) + "\n")
    with pytest.raises(ValueError, match="earlier include entry"):
        read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="geneval prompts"):
        read_prompts(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- GenEval's position rule
def test_relative_position_matches_geneval_rule():
    box = (20, 20, 36, 36)
    assert relative_position((0, 20, 16, 36), box) == {"left of"}
    assert relative_position((40, 22, 56, 38), box) == {"right of"}
    assert relative_position((22, 0, 38, 16), box) == {"above"}
    assert relative_position((18, 44, 34, 60), box) == {"below"}
    assert relative_position((0, 0, 16, 16), box) == {"left of", "above"}  # diagonal: both hold
    assert relative_position((4, 0, 20, 16), box) == {"above"}
    # offsets shrink by 0.1 x (16 + 16) = 3.2 px: 3 px apart is no relation at all
    assert relative_position((23, 20, 39, 36), box) == set()
    # 8 px apart horizontally (ShapesWorld's margin) but 20 px vertically: only "above"
    assert relative_position((12, 0, 28, 16), box) == {"above"}


# ---------------------------------------------------------------- detector
def bfs_components(mask):
    """An independent reference: breadth-first search, 4-connectivity."""
    seen, comps = np.zeros_like(mask), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, queue = set(), deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            comp.add((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(frozenset(comp))
    return set(comps)


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_label_components_matches_bfs(density):
    mask = np.random.default_rng(int(density * 10)).random((40, 40)) < density
    labels, n = label_components(mask)
    ours = {frozenset(zip(*np.nonzero(labels == i))) for i in range(1, n + 1)}
    assert ours == bfs_components(mask) and (labels > 0).sum() == mask.sum()


def test_detector_recovers_val_scenes_exactly():
    rng = np.random.default_rng(0)
    for scene in VAL:
        clean = np.asarray(render(scene))
        dets = detect(clean)
        assert same_objects(dets, scene), (scene, dets)
        for o in scene.objects:  # boxes: exact for squares/circles, apex may lose 2 px
            d = min(dets, key=lambda d: np.abs(np.subtract(d.bbox, o.bbox)).sum())
            assert np.abs(np.subtract(d.bbox, o.bbox)).max() <= (2 if o.shape == "triangle" else 0)
        noisy = add_noise(gaussian_blur(clean, 1.0), 10 / 255, rng)
        assert same_objects(detect(noisy), scene), (scene, detect(noisy))


def test_detector_ignores_non_palette_colours_and_specks():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[5:25, 5:25] = (128, 128, 128)  # grey: on no palette colour's line
    img[40:60, 40:60] = (0, 0, 0)  # black
    img[30:33, 30:33] = PALETTE["red"]  # 9 px speck
    img[2:4, 50:60] = PALETTE["blue"]  # 20 px sliver
    assert detect(img) == []
    img[40:58, 5:23] = PALETTE["green"]
    assert [(d.color, d.shape) for d in detect(Image.fromarray(img))] == [("green", "square")]


def test_detector_splits_touching_objects_of_two_colours():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:28, 10:28] = PALETTE["red"]
    img[10:28, 28:46] = PALETTE["yellow"]  # touching, no gap
    assert sorted((d.color, d.shape) for d in detect(img)) == [("red", "square"), ("yellow", "square")]


def test_detector_resizes_other_sizes():
    scene = VAL[3]
    big = render(scene).resize((128, 128), Image.NEAREST)
    assert same_objects(detect(big), scene)


# ---------------------------------------------------------------- scoring rule
def det(shape, color, bbox):
    return Detection(shape, color, bbox, 100, 1.0, 1.0)


RED_LEFT = det("circle", "red", (4, 20, 20, 36))
BLUE_RIGHT = det("square", "blue", (40, 20, 56, 36))


def prompt(text):
    return next(m for m in PROMPTS if m["prompt"] == text)


COLOR_ATTR = next(m for m in PROMPTS if m["tag"] == "color_attr")

RED_CIRCLE_LEFT_OF_BLUE_SQUARE = {
    "tag": "position", "prompt": "a photo of a red circle left of a blue square",
    "include": [{"class": "square", "count": 1, "color": "blue"},
                {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}],
    "exclude": [{"class": "square", "count": 2}, {"class": "circle", "count": 2}]}


def test_evaluate_position_colour_and_exact_counts():
    pos = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    assert evaluate([RED_LEFT, BLUE_RIGHT], pos) == (True, "")
    swapped = [det("circle", "red", BLUE_RIGHT.bbox), det("square", "blue", RED_LEFT.bbox)]
    ok, reason = evaluate(swapped, pos)
    assert not ok and "expected red circle left of target, found right of" in reason
    ok, reason = evaluate([det("circle", "green", RED_LEFT.bbox), BLUE_RIGHT], pos)
    assert not ok and "expected red circle>=1, found 0" in reason
    extra = [RED_LEFT, BLUE_RIGHT, det("circle", "green", (20, 44, 34, 58))]
    ok, reason = evaluate(extra, pos)
    assert not ok and reason == "expected circle<2, found 2"
    three = prompt("a photo of three triangles")
    tris = [det("triangle", c, (i * 16, 4, i * 16 + 14, 18))
            for i, c in enumerate(["red", "blue", "red", "green"])]
    assert evaluate(tris[:3], three)[0] and not evaluate(tris[:2], three)[0] and not evaluate(tris, three)[0]
    # unlisted classes are free, as in GenEval
    assert evaluate(tris[:3] + [BLUE_RIGHT], three)[0]


def test_evaluate_filters_by_colour_before_counting():
    meta = prompt_from_scene(Scene((Obj("circle", "red", (2, 2, 16, 16)),
                                    Obj("circle", "blue", (30, 2, 44, 16)),
                                    Obj("circle", "red", (2, 40, 16, 54)))))
    assert meta["include"] == [{"class": "circle", "count": 2, "color": "red"},
                               {"class": "circle", "count": 1, "color": "blue"}]
    assert meta["exclude"] == [{"class": "circle", "count": 4}, {"class": "square", "count": 1},
                               {"class": "triangle", "count": 1}]  # a scene prompt is exhaustive
    big_blue = Detection("circle", "blue", (30, 2, 50, 22), 300, 0.8, 1.0)  # largest first
    dets = [big_blue, det("circle", "red", (2, 2, 16, 16)), det("circle", "red", (2, 40, 16, 54))]
    assert evaluate(dets, meta) == (True, "")


def test_summary_seen_unseen_are_tag_balanced():
    rec = lambda tag, unseen, correct: {"tag": tag, "unseen": unseen, "correct": correct}  # noqa: E731
    records = ([rec("single_object", False, True)] * 4 + [rec("colors", False, True)] * 3
               + [rec("colors", True, False)] * 1 + [rec("color_attr", False, False)] * 2
               + [rec("color_attr", True, True)] * 2)
    r = summarize(records)
    assert r.per_tag == {"single_object": 1.0, "colors": 0.75, "color_attr": 0.5}
    assert r.overall == pytest.approx(0.75)
    assert r.seen == pytest.approx(0.5) and r.unseen == pytest.approx(0.5)  # single_object left out
    assert summarize([rec("counting", False, True)]).seen is None
    # overall_seen counts every tag over its seen prompts: (1 + 1 + 0) / 3; unseen: (0 + 1) / 2
    assert r.overall_by_split() == pytest.approx({"overall_seen": 1 / 3 + 1 / 3, "overall_unseen": 0.5})
    assert summarize([rec("counting", False, True)]).overall_by_split() == {"overall_seen": 1.0,
                                                                           "overall_unseen": None}


def test_object_counts_say_blank_fewer_exact_more():
    two = prompt("a photo of a circle and a square")
    blank = np.full((64, 64, 3), 255, np.uint8)
    one, both = (render(Scene(objs)) for objs in [(Obj("circle", "red", (4, 20, 20, 36)),),
                                                    (Obj("circle", "red", (4, 20, 20, 36)),
                                                     Obj("square", "blue", (40, 20, 56, 36)))])
    three = render(Scene((Obj("circle", "red", (4, 4, 18, 18)), Obj("square", "blue", (40, 4, 54, 18)),
                          Obj("circle", "green", (20, 40, 34, 54)))))
    counts = score_images([blank, one, both, three], [two] * 4).object_counts()
    assert counts == {"two_object": {"blank": 0.25, "fewer": 0.5, "exact": 0.25, "more": 0.25}}


# ---------------------------------------------------------------- reconstruction prompts
def test_prompt_from_scene_describes_its_own_scene():
    num_position = 0
    for i, scene in enumerate(VAL):
        m = prompt_from_scene(scene)
        assert m["prompt"] in captions(scene) and m["tag"] == f"scene_{len(scene.objects)}"
        assert m["unseen"] == scene.unseen
        num_position += any("position" in e for e in m["include"])
        assert evaluate(detect(render(scene)), m)[0], m
        other = prompt_from_scene(VAL[(i + 1) % len(VAL)])
        if Counter((o.color, o.shape) for o in VAL[(i + 1) % len(VAL)].objects) != Counter(
                (o.color, o.shape) for o in scene.objects):
            assert not evaluate(detect(render(scene)), other)[0]
    assert num_position > 10


# ---------------------------------------------------------------- folder layout and CLI
def test_reference_scenes_satisfy_their_prompts():
    for i, m in enumerate(PROMPTS[::7]):
        scene = reference_scene(m, np.random.default_rng(i))
        assert Counter(o.shape for o in scene.objects) == Counter(
            {e["class"]: e["count"] for e in m["include"]})
        for e in m["include"]:
            if "position" in e:
                a, b = (next(o for o in scene.objects if o.shape == x["class"]) for x in (e, m["include"][0]))
                assert relation(a, b) == e["position"][0]


def test_folder_roundtrip_and_cli(tmp_path, capsys):
    prompts = [COLOR_ATTR, PROMPTS[0], next(m for m in PROMPTS if m["tag"] == "position")]
    out = write_geneval_folder(tmp_path / "ref", prompts, reference_images, samples_per_prompt=2)
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    assert sorted(p.name for p in (out / "00002" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == prompts[0]
    assert score_folder(out).overall == 1.0
    blank = lambda batch, seed: [Image.new("RGB", (64, 64), "white") for _ in batch]  # noqa: E731
    write_geneval_folder(tmp_path / "blank", prompts, blank, samples_per_prompt=1)
    assert cli_main(["geneval", "score", str(tmp_path / "blank")]) == 0
    results = json.loads((tmp_path / "blank" / "results.json").read_text())
    assert set(results) == {"overall", "seen", "unseen", "color_attr", "single_object", "position"}
    assert results["overall"] == 0.0 and "overall" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds"):
        write_geneval_folder(out, prompts, reference_images)
    with pytest.raises(ValueError, match="returned 1 images for a batch of 2"):
        write_geneval_folder(tmp_path / "x", prompts, lambda b, s: b[:1], samples_per_prompt=2)
    assert cli_main(["geneval", "score", str(tmp_path / "empty_missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a directory" in err


def test_reference_cli_is_seeded(tmp_path):
    args = ["geneval", "reference", "--samples-per-prompt", "1", "--prompts", str(tmp_path / "p.jsonl")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(m) + "\n" for m in PROMPTS[:6:2]))
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b")]) == 0
    for i in range(3):
        pa, pb = (tmp_path / d / f"{i:05d}" / "samples" / "0000.png" for d in "ab")
        assert pa.read_bytes() == pb.read_bytes()


# ---------------------------------------------------------------- calibration
def test_calibration_reference_near_one_shuffled_near_chance():
    cal = calibrate(PROMPTS, samples_per_prompt=1, seed=0)
    overall = cal.overall()
    assert overall["clean"] >= 0.99
    assert overall["blurred"] >= 0.95 and overall["noisy"] >= 0.95 and overall["blurred_noisy"] >= 0.95
    assert min(cal.detection_exact.values()) >= 0.99
    # "chance": the same wrong pairings scored on the scene graphs themselves (no detector)
    shuffled = cal.results["shuffled"]
    oracle = []
    for r, i in zip(shuffled.records, range(len(shuffled.records))):
        scene = reference_scene(PROMPTS[i], np.random.default_rng([0, i]))
        truth = [det(o.shape, o.color, o.bbox) for o in scene.objects]
        oracle.append({"tag": r["tag"], "unseen": r["unseen"],
                       "correct": evaluate(truth, next(m for m in PROMPTS if m["prompt"] == r["prompt"]))[0]})
    assert shuffled.overall == pytest.approx(summarize(oracle).overall, abs=0.02)
    assert shuffled.overall < 0.2
    assert "shuffled" in cal.table()


def test_miss_kind_names_the_first_broken_constraint():
    def kind(dets, meta=RED_CIRCLE_LEFT_OF_BLUE_SQUARE):
        correct, reason = evaluate(dets, meta)
        return miss_kind({"correct": correct, "detections": [d.to_dict() for d in dets]}, meta), reason

    assert kind([RED_LEFT, BLUE_RIGHT]) == (None, "")
    assert kind([])[0] == "blank"
    assert kind([det("triangle", "red", RED_LEFT.bbox), BLUE_RIGHT])[0] == "shape wrong"
    assert kind([det("circle", "green", RED_LEFT.bbox), BLUE_RIGHT])[0] == "colour wrong"
    assert kind([det("triangle", "green", RED_LEFT.bbox), BLUE_RIGHT])[0] == "absent"
    assert kind([RED_LEFT, BLUE_RIGHT, det("circle", "green", (20, 44, 34, 58))])[0] == "too many"
    wrong_place, reason = kind([det("circle", "red", BLUE_RIGHT.bbox), det("square", "blue", RED_LEFT.bbox)])
    assert wrong_place == "wrong place" and "target" in reason
    three = prompt("a photo of three triangles")
    assert kind([det("triangle", "red", (i * 16, 4, i * 16 + 14, 18)) for i in range(2)], three)[0] == "too few"
    assert kind([det("circle", "red", (4, 4, 18, 18))], three)[0] == "absent"
    assert len(MISS_KINDS) == 7


def test_drawn_relation_and_shape_read_the_largest_object_of_each_colour():
    pos = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    red, blue = RED_LEFT.to_dict(), BLUE_RIGHT.to_dict()
    assert drawn_relation([], pos) is None and drawn_relation([red], pos) is None
    assert drawn_relation([red, blue], pos) == {"left of"}  # the red object's relation to the blue one
    assert drawn_relation([red | {"bbox": blue["bbox"]}, blue | {"bbox": red["bbox"]}], pos) == {"right of"}
    # shapes do not matter, and a red speck right of the blue square does not move the red object
    speck = det("triangle", "red", (58, 20, 60, 22)).to_dict() | {"area": 4}
    assert drawn_relation([red | {"shape": "triangle"}, blue, speck], pos) == {"left of"}
    assert drawn_shape([speck, red], pos["include"][1]) == "circle"
    assert drawn_shape([blue], pos["include"][1]) is None
    # the verdict against the asked "left of": asked, opposite, a perpendicular relation, a colour missing
    assert relation_verdict([red, blue], pos) == "asked"
    assert relation_verdict([red | {"bbox": blue["bbox"]}, blue | {"bbox": red["bbox"]}], pos) == "opposite"
    assert relation_verdict([red | {"bbox": (40, 2, 56, 18)}, blue | {"bbox": (40, 44, 56, 60)}], pos) == "neither"
    assert relation_verdict([blue], pos) is None
