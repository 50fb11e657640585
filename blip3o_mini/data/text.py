"""Captions and question-answer pairs computed exactly from a ShapesWorld scene graph.

Captions follow a small regular grammar (so `parse_caption` can read them back into a scene
graph for caption accuracy), with paraphrases in the styles a text-to-image model meets:
plain lists, "a photo of ..." (GenEval's own prompt style), relations, and colour-free forms.
"""

from __future__ import annotations

from collections import Counter
import re
import zlib

import numpy as np

from .world import COLORS, DEFAULT_RELATION_RULE, HELD_OUT, IMAGE_SIZE, SHAPES, Obj, Scene, relation

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QUESTION_TYPES = ("color", "shape", "count", "relation", "existence")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def with_article(word: str) -> str:
    """English indefinite article: with_article("red") -> "a red", with_article("orange") -> "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(shape: str) -> str:
    return shape + "s"


def noun_phrase(count: int, shape: str, color: str | None = None) -> str:
    """`noun_phrase(2, "circle", "red")` -> "two red circles"; count 1 -> "a red circle"."""
    words = " ".join(([color] if color else []) + [shape if count == 1 else plural(shape)])
    return with_article(words) if count == 1 else f"{NUMBERS[count]} {words}"


def join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(objs: tuple[Obj, ...], with_color: bool) -> list[str]:
    """Noun phrases for a scene, grouped by (colour, shape), in left-to-right order."""
    order = sorted(objs, key=lambda o: o.center[0])
    keys = [(o.color if with_color else None, o.shape) for o in order]
    counts = Counter(keys)
    seen: list = []
    for k in keys:
        if k not in seen:
            seen.append(k)
    return [noun_phrase(counts[k], k[1], k[0]) for k in seen]


def captions(scene: Scene, rule: str = DEFAULT_RELATION_RULE) -> list[str]:
    """Paraphrases describing the scene; the first is the canonical one. A two-object scene's
    relation is stated by `rule` (`world.RELATION_RULES`)."""
    listed = join(_groups(scene.objects, with_color=True))
    out = [listed, f"a photo of {listed}"]
    if len(scene.objects) == 2:
        a, b = sorted(scene.objects, key=lambda o: o.center[0])
        rel = relation(a, b, rule)
        if rel is not None:
            pa, pb = noun_phrase(1, a.shape, a.color), noun_phrase(1, b.shape, b.color)
            # Both orders, so every relation word ("right of", "below") appears in training text.
            for (p, q), r in (((pa, pb), rel), ((pb, pa), INVERSE[rel])):
                out += [f"{p} to the {r} {q}" if r in ("left of", "right of") else f"{p} {r} {q}",
                        f"a photo of {p} {r} {q}"]
    out.append(f"a photo of {join(_groups(scene.objects, with_color=False))}")
    return out


_PHRASE = re.compile(
    r"(a|an|one|two|three|four) (?:(" + "|".join(COLORS) + r") )?(" + "|".join(SHAPES) + r")s?\b"
)


def parse_caption(text: str) -> Counter:
    """Read a caption back as a multiset of (colour or None, shape) -> count.

    Inverse of `captions` for the object content (relations are not parsed back).
    """
    out: Counter = Counter()
    for article, color, shape in _PHRASE.findall(text.lower()):
        out[(color or None, shape)] += 1 if article in ("a", "an", "one") else NUMBERS.index(article)
    return out


def scene_counter(scene: Scene, with_color: bool = True) -> Counter:
    return Counter((o.color if with_color else None, o.shape) for o in scene.objects)


def _the(o: Obj) -> str:
    return f"the {o.color} {o.shape}"


def _named(scene: Scene) -> list[Obj]:
    """The objects a question can name: no other object shares their colour and shape."""
    counts = scene_counter(scene)
    return [o for o in scene.objects if counts[o.color, o.shape] == 1]


def _ask_relation(a: Obj, b: Obj, rng: np.random.Generator, rule: str) -> tuple[str, str]:
    """"is A <relation> B?" -> yes, or with the inverse relation -> no, by a fair coin."""
    rel = relation(a, b, rule)
    asked, answer = (rel, "yes") if rng.random() < 0.5 else (INVERSE[rel], "no")
    return f"is {_the(a)} {asked} {_the(b)}?", answer


def _ask_count(shape: str, shape_counts: Counter) -> tuple[str, str]:
    """"how many circles are there?" -> "two" (zero included), one wording for every use."""
    return f"how many {plural(shape)} are there?", NUMBERS[shape_counts[shape]]


def questions(scene: Scene, rng: np.random.Generator, allow_unseen: bool = False,
              rule: str = DEFAULT_RELATION_RULE) -> list[dict]:
    """Question-answer pairs of five types with one-word answers, exact from the scene graph.

    Each item: {"question", "answer", "type"}. Questions never name a held-out composition
    unless `allow_unseen` (so training text never mentions one). Relations follow `rule`
    (`world.RELATION_RULES`).
    """
    objs = scene.objects
    qa: list[dict] = []
    add = lambda q, a, t: qa.append({"question": q, "answer": a, "type": t})  # noqa: E731

    add("how many objects are there?", NUMBERS[len(objs)], "count")
    shape_counts = Counter(o.shape for o in objs)
    color_counts = Counter(o.color for o in objs)
    asked_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    add(*_ask_count(asked_shape, shape_counts), "count")

    for o in objs:
        if shape_counts[o.shape] == 1:
            add(f"what color is the {o.shape}?", o.color, "color")
        if color_counts[o.color] == 1:
            add(f"what shape is the {o.color} object?", o.shape, "shape")

    present = {(o.color, o.shape) for o in objs}
    askable = [(c, s) for c in COLORS for s in SHAPES if allow_unseen or (c, s) not in HELD_OUT]
    yes = sorted(present & set(askable))
    no = sorted(set(askable) - present)
    if yes:
        c, s = yes[int(rng.integers(len(yes)))]
        add(f"is there {with_article(c)} {s}?", "yes", "existence")
    c, s = no[int(rng.integers(len(no)))]
    add(f"is there {with_article(c)} {s}?", "no", "existence")

    unique = _named(scene)
    pairs = [(a, b) for a in unique for b in unique if a is not b and relation(a, b, rule)]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        add(*_ask_relation(a, b, rng, rule), "relation")
    return qa


def position_turns(scene: Scene) -> list[tuple[str, str]]:
    """Where each uniquely named object sits: "where is the red circle?" -> "left" or "right"
    of the image's middle, "how high is the red circle?" -> "above" or "below" it.

    Training turns only (not a VQA question type): one attention hop from a name to a place,
    the step a relation question ("is A left of B?") needs twice. LLaVA-1.5 mixes grounding data
    (RefCOCO, Visual Genome boxes as text) into its instruction data for the same reason."""
    turns = []
    for o in _named(scene):
        x, y = o.center
        turns.append((f"where is {_the(o)}?", "left" if x < IMAGE_SIZE / 2 else "right"))
        turns.append((f"how high is {_the(o)}?", "above" if y < IMAGE_SIZE / 2 else "below"))
    return turns


def _related_pairs(scene: Scene, rng: np.random.Generator, rule: str):
    """Each pair of uniquely named objects that stands in a relation, once: (x, y, relation of x
    to y), the pair's order drawn from `rng` as the pairs are consumed (a caller may draw from
    the same `rng` between pairs)."""
    unique = _named(scene)
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            x, y = (b, a) if rng.random() < 0.5 else (a, b)
            if (rel := relation(x, y, rule)) is not None:
                yield x, y, rel


def relation_turns(scene: Scene, rule: str = DEFAULT_RELATION_RULE) -> list[tuple[str, str]]:
    """Every relation the scene states, asked once per pair of uniquely named objects:
    "is the red circle left of the blue square?" -> yes, or its inverse -> no.

    Training turns only: the VQA set asks one relation per image (`questions`), about 8% of its
    questions, too few for the small LM to learn the two-hop comparison in the mix. The pair's
    order and the yes / no side are drawn from a hash of the scene, so a row packs the same turns
    every time it is built."""
    rng = np.random.default_rng(zlib.crc32(repr(scene.objects).encode()))
    return [_ask_relation(x, y, rng, rule) for x, y, _ in _related_pairs(scene, rng, rule)]  # order coin, then yes / no coin


def direction_turns(scene: Scene, rule: str = DEFAULT_RELATION_RULE) -> list[tuple[str, str]]:
    """Where each uniquely named object is from each other one, asked once per pair:
    "where is the red circle from the blue square?" -> "left", "right", "above" or "below".

    Training turns only. A relation question's yes / no is the XNOR of two things: the relation
    the image shows and the relation the question asks. The asked word alone says nothing (a fair
    coin picks the true relation or its inverse) and one object's place alone says little, so the
    answer loss has almost no slope toward reading the shown relation until both are read at
    once: the toy LM sits at chance (ln 2) for hundreds of steps and leaves it in some runs only
    (docs/status.md). These turns ask for the shown relation itself, a target with a slope from
    the first step. Pair order comes from a hash of the scene, as in `relation_turns`."""
    rng = np.random.default_rng(zlib.crc32(repr(scene.objects).encode()) + 1)
    return [(f"where is {_the(x)} from {_the(y)}?", rel.split()[0]) for x, y, rel in _related_pairs(scene, rng, rule)]


def count_turns(scene: Scene, asked: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """How many of each shape the scene holds, zero included: "how many circles are there?" ->
    "two", for every shape whose question is not already in `asked`.

    Training turns only: the VQA set asks one shape's count per image (`questions`), and the toy
    LM undercounts (most of its count mistakes are one short). A question already asked in the
    row is left out, so the later copy cannot be answered by reading the earlier answer."""
    counts = Counter(o.shape for o in scene.objects)
    turns = [_ask_count(s, counts) for s in SHAPES]  # the wording `questions` asks, so `asked` matches
    return [t for t in turns if t[0] not in asked]
