"""Do the training captions' relations mean what GenEval's rule scores?

ShapesWorld captions a two-object scene with one relation per order ("A left of B", "B right of
A"), picked by a relation rule (`data.world.RELATION_RULES`). GenEval-mini scores a generated
pair with GenEval's own rule (`prompts.relative_position`), which holds a relation when the
centre offset points within about 60 degrees of its axis. Where the two disagree, the generator
is taught one layout for a word and scored on another; `position_ceiling` is what that costs a
generator that draws exactly the training layouts (docs/status.md, "The caption rule contradicts
GenEval's"; `scripts/relation_rule.py` prints the tables).
"""

from __future__ import annotations

from collections import Counter

from ..data import relation
from .prompts import relative_position


def caption_relations(scenes, rule: str) -> list[tuple[str, set[str]]]:
    """(word the caption says, GenEval's relations of the same ordered pair) for both orders of
    every related two-object scene, as `data.text.captions` states them."""
    out = []
    for scene in scenes:
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        for x, y in ((a, b), (b, a)):
            if (word := relation(x, y, rule)) is not None:
                out.append((word, relative_position(x.bbox, y.bbox)))
    return out


def agreement(stated: list[tuple[str, set[str]]]) -> dict[str, tuple[int, int]]:
    """Per relation word: (captions saying it, of which GenEval's rule holds it too)."""
    said, held = Counter(), Counter()
    for word, geneval in stated:
        said[word] += 1
        held[word] += word in geneval
    return {w: (said[w], held[w]) for w in said}


def position_ceiling(stated: list[tuple[str, set[str]]], prompt_words: list[str]) -> float:
    """Mean over position prompts of P(GenEval holds the word | a caption says it): the most a
    generator drawing exactly the training layout of each caption can score on position."""
    table = agreement(stated)
    if missing := sorted(set(prompt_words) - set(table)):
        raise ValueError(f"no caption says {missing}: read more scenes (scripts/relation_rule.py --num-train)")
    return sum(table[w][1] / table[w][0] for w in prompt_words) / len(prompt_words)
