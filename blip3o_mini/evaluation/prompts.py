"""GenEval-mini prompts and their metadata, in GenEval's format (Ghosh et al. 2023,
`prompts/evaluation_metadata.jsonl`), the benchmark BLIP3-o reports (0.84 for the 8B model).

One JSON object a line::

    {"tag": "position",
     "include": [{"class": "square", "count": 1, "color": "blue"},
                 {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}],
     "exclude": [{"class": "square", "count": 2}, {"class": "circle", "count": 2}],
     "prompt": "a photo of a red circle left of a blue square", "unseen": false}

`include` entries must all be found (`count` objects of `class`, of `color` if given, and
`position` relative to the objects matched for include entry `position[1]`); an `exclude`
entry fails the image when `count` or more such objects are present. GenEval excludes only
for `counting`; GenEval-mini adds `exclude` for every listed class so that all counts are
exact. `unseen` marks prompts naming a held-out colour+shape composition.

The six tags mirror GenEval's. ShapesWorld's vocabulary is small (3 shapes, 6 colours), so a
tag with fewer compositions than `per_tag` repeats each of them equally often (single_object:
3 prompts x 18, two_object 6 x 9, counting 9 x 6, colors 18 x 3); position and color_attr
sample `per_tag` distinct compositions. Prompt text is exactly the "a photo of ..." captions
of ShapesWorld (`data.text`), so a model trained on ShapesWorld captions has seen this style.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..data.text import captions, noun_phrase
from ..data.world import COLORS, HELD_OUT, RELATIONS, SHAPES, Scene, relation

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNTS = (2, 3, 4)  # counting prompts; a ShapesWorld scene holds at most 4 objects
PER_TAG = 54  # prompts per tag: a multiple of 3, 6, 9 and 18 so repeated tags stay balanced
POSITION_THRESHOLD = 0.1  # GenEval's: centre offsets shrink by 0.1 x (sum of box sizes)
DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "data" / "geneval_mini_prompts.jsonl"


def _entry(shape: str, count: int = 1, color: str | None = None, position=None) -> dict:
    e: dict = {"class": shape, "count": count}
    if color is not None:
        e["color"] = color
    if position is not None:
        e["position"] = list(position)
    return e


def _metadata(tag: str, include: list[dict], prompt: str) -> dict:
    """Complete a prompt: exact counts for every listed class, and the `unseen` flag."""
    totals = Counter()
    for e in include:
        totals[e["class"]] += e["count"]
    exclude = [{"class": c, "count": n + 1} for c, n in totals.items()]
    unseen = any((e.get("color"), e["class"]) in HELD_OUT for e in include)
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": prompt, "unseen": unseen}


def _a(shape: str, color: str | None = None) -> str:
    return noun_phrase(1, shape, color)


def compositions(tag: str) -> list[dict]:
    """Every distinct prompt of a tag, in a fixed order."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if tag == "single_object":
        return [_metadata(tag, [_entry(s)], f"a photo of {_a(s)}") for s in SHAPES]
    if tag == "two_object":
        return [_metadata(tag, [_entry(a), _entry(b)], f"a photo of {_a(a)} and {_a(b)}")
                for a, b in itertools.permutations(SHAPES, 2)]
    if tag == "counting":
        return [_metadata(tag, [_entry(s, n)], f"a photo of {noun_phrase(n, s)}")
                for s in SHAPES for n in COUNTS]
    if tag == "colors":
        return [_metadata(tag, [_entry(s, 1, c)], f"a photo of {_a(s, c)}") for c, s in pairs]
    two = [((ca, sa), (cb, sb)) for (ca, sa), (cb, sb) in itertools.permutations(pairs, 2)
           if ca != cb and sa != sb]  # distinct classes and colours, as GenEval's color_attr
    if tag == "color_attr":
        return [_metadata(tag, [_entry(sa, 1, ca), _entry(sb, 1, cb)],
                          f"a photo of {_a(sa, ca)} and {_a(sb, cb)}") for (ca, sa), (cb, sb) in two]
    if tag == "position":  # GenEval: include[0] is the reference B, include[1] is A "rel" B
        return [_metadata(tag, [_entry(sb, 1, cb), _entry(sa, 1, ca, (rel, 0))],
                          f"a photo of {_a(sa, ca)} {rel} {_a(sb, cb)}")
                for (ca, sa), (cb, sb) in two for rel in RELATIONS]
    raise ValueError(f"unknown GenEval-mini tag {tag!r}; expected one of {TAGS}")


def make_prompts(per_tag: int = PER_TAG, seed: int = 0) -> list[dict]:
    """All GenEval-mini prompts, deterministic for `(per_tag, seed)`; tags in `TAGS` order."""
    if per_tag < 1:
        raise ValueError(f"per_tag must be >= 1, got {per_tag}")
    out: list[dict] = []
    for t, tag in enumerate(TAGS):
        comps = compositions(tag)
        if len(comps) <= per_tag:  # small tags: every composition, repeated round-robin
            out += [comps[i % len(comps)] for i in range(per_tag)]
        else:
            rng = np.random.default_rng([seed, t])
            out += [comps[i] for i in sorted(rng.choice(len(comps), per_tag, replace=False))]
    return [json.loads(json.dumps(m)) for m in out]  # independent copies


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's rule: the relations of box A to box B (`(x0, y0, x1, y1)`, y down).

    The centre offset shrinks on each axis by `threshold` x (sum of the two box sizes); an
    axis holds a relation when its shrunken offset is over half the raw offset's length.
    """
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)  # (2,) centre of A minus centre of B: (dx, dy)
    size = (a[1] - a[0]) + (b[1] - b[0])  # (2,)
    shrunk = np.maximum(np.abs(offset) - threshold * size, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def prompt_from_scene(scene: Scene, tag: str | None = None) -> dict:
    """GenEval-mini metadata describing a scene graph exactly (for reconstruction scoring).

    Counts and colours of every (colour, shape) group, every shape's count exact (shapes the
    scene lacks are excluded); for two distinct objects whose ShapesWorld relation GenEval's
    rule agrees with, the position too. The prompt is the scene's own "a photo of ..." caption.
    `tag` defaults to "scene_<number of objects>".
    """
    objs = sorted(scene.objects, key=lambda o: o.center[0])
    if not objs:
        raise ValueError("prompt_from_scene needs a scene with at least one object")
    tag = tag or f"scene_{len(objs)}"
    a, b = objs[0], objs[-1]
    rel = relation(a, b) if len(objs) == 2 and (a.color, a.shape) != (b.color, b.shape) else None
    if rel is not None and rel in relative_position(a.bbox, b.bbox):  # both rules agree
        meta = _metadata(tag, [_entry(b.shape, 1, b.color), _entry(a.shape, 1, a.color, (rel, 0))],
                         f"a photo of {_a(a.shape, a.color)} {rel} {_a(b.shape, b.color)}")
    else:
        groups = Counter((o.color, o.shape) for o in objs)  # insertion order = left to right
        meta = _metadata(tag, [_entry(s, n, c) for (c, s), n in groups.items()], captions(scene)[1])
    # the prompt describes the whole scene: a shape it does not name must be absent
    meta["exclude"] += [{"class": s, "count": 1} for s in SHAPES if s not in {o.shape for o in objs}]
    return meta


def validate_metadata(m: dict, where: str = "metadata") -> dict:
    """Check one metadata object; raise a ValueError naming the problem."""
    if not isinstance(m, dict) or not isinstance(m.get("prompt"), str) or "tag" not in m:
        raise ValueError(f"{where}: expected a JSON object with 'tag', 'prompt' and 'include'")
    include = m.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of {{class, count}} entries")
    for i, e in enumerate(include + m.get("exclude", [])):
        if e.get("class") not in SHAPES:
            raise ValueError(f"{where}: class {e.get('class')!r} is not a ShapesWorld shape {SHAPES}")
        if not isinstance(e.get("count"), int) or e["count"] < 1:
            raise ValueError(f"{where}: count must be a positive integer, got {e.get('count')!r}")
        if "color" in e and e["color"] not in COLORS:
            raise ValueError(f"{where}: color {e['color']!r} is not a palette colour {COLORS}")
        if "position" in e:
            rel, target = e["position"]
            if rel not in RELATIONS or not (isinstance(target, int) and 0 <= target < i < len(include)):
                raise ValueError(f"{where}: position {e['position']!r} must be [relation, index of "
                                 f"an earlier include entry] with relation in {RELATIONS}")
    return m


def write_prompts(path: str | Path, prompts: list[dict]) -> None:
    from ..artifacts import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(m) + "\n" for m in prompts).encode())


def read_prompts(path: str | Path) -> list[dict]:
    """Read a metadata JSONL file (GenEval's `evaluation_metadata.jsonl` format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; write one with "
                                "`blip3o-mini geneval prompts --out FILE`")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            m = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        out.append(validate_metadata(m, f"{path}:{i + 1}"))
    if not out:
        raise ValueError(f"prompt file {path} is empty")
    return out
