"""Why a GenEval-mini image was marked wrong, one level finer than GenEval's `reason`, and what
a generator drew for the colour-named objects of a prompt.

Every function reads an image's score record or its detections as the records store them
(dicts with `shape`, `color`, `bbox`, `area`: `Detection.to_dict()`), and a prompt's metadata in
GenEval's format.

`miss_kind` follows `score.evaluate`'s order (includes, then excludes, then positions), so each
missed image gets the kind of the first constraint it breaks:

    blank          nothing detected
    absent         no object of the asked kind (for a colour-named object: neither its colour
                   nor its shape in any object)
    shape wrong    an object of the asked colour is there, not of the asked shape
    colour wrong   the asked shape is there, in another colour
    too few        some of the asked objects, fewer than the count
    too many       an `exclude` entry's count reached (extra copies)
    wrong place    every object right, a relation not
"""

from __future__ import annotations

from ..data.text import INVERSE
from .prompts import relative_position

MISS_KINDS = ("blank", "absent", "shape wrong", "colour wrong", "too few", "too many", "wrong place")


def _matches(d: dict, req: dict) -> bool:
    return d["shape"] == req["class"] and d["color"] == req.get("color", d["color"])


def miss_kind(record: dict, metadata: dict) -> str | None:
    """The kind (one of `MISS_KINDS`) of the first constraint a scored image breaks, from its
    score record (`correct`, `detections`); None when it is correct."""
    if record["correct"]:
        return None
    detections = record["detections"]
    if not detections:
        return "blank"
    for req in metadata["include"]:
        found = sum(_matches(d, req) for d in detections)
        if found < req["count"]:
            if found:
                return "too few"
            if "color" in req and any(d["color"] == req["color"] for d in detections):
                return "shape wrong"
            if "color" in req and any(d["shape"] == req["class"] for d in detections):
                return "colour wrong"
            return "absent"
    for req in metadata.get("exclude", []):
        if sum(_matches(d, req) for d in detections) >= req["count"]:
            return "too many"
    return "wrong place"  # every count holds, so GenEval's rule failed on a relation


def largest_of_colour(detections: list[dict], colour: str) -> dict | None:
    """The largest detected object of `colour` (by area), or None."""
    same = [d for d in detections if d["color"] == colour]
    return max(same, key=lambda d: d["area"]) if same else None


def drawn_shape(detections: list[dict], req: dict) -> str | None:
    """For a colour-named `include` entry: the shape of the largest object drawn in its colour."""
    d = largest_of_colour(detections, req["color"])
    return d["shape"] if d else None


def drawn_relation(detections: list[dict], metadata: dict) -> set[str] | None:
    """For a position prompt ("A left of B": `include` = [B, A with `position`]): GenEval's
    relations of the largest object in A's colour to the largest in B's, whatever their shapes;
    None when either colour is missing. A generator that ignores the relation word draws the
    asked relation and its opposite about equally often."""
    reference, anchored = metadata["include"]
    a = largest_of_colour(detections, anchored["color"])
    b = largest_of_colour(detections, reference["color"])
    if a is None or b is None:
        return None
    return relative_position(a["bbox"], b["bbox"])


def relation_verdict(detections: list[dict], metadata: dict) -> str | None:
    """For a position prompt: "asked" when `drawn_relation` holds the asked relation, "opposite"
    when it holds its inverse, "neither" when it holds no relation on that axis (a perpendicular
    one, or none); None when either colour is missing."""
    holds = drawn_relation(detections, metadata)
    if holds is None:
        return None
    rel = metadata["include"][1]["position"][0]
    return "asked" if rel in holds else "opposite" if INVERSE[rel] in holds else "neither"
