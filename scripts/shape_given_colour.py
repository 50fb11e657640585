"""Where colour-named objects go wrong in GenEval-mini images: their colour, or their shape?

    python scripts/shape_given_colour.py ~/.cache/blip3o-mini/runs/toy RUN_DIR2 ...
    python scripts/shape_given_colour.py path/to/geneval_folder

Reads each run's generated images (RUN_DIR/evaluation/geneval, GenEval's layout; or a GenEval
folder itself) and scores them with the GenEval-mini detector. For every object a prompt names
with its colour (tags colors, position, color_attr) it counts whether an object of that colour
was drawn, and whether one of them has the asked shape; then, per asked shape, what the largest
object of the asked colour was drawn as (before session 38: the first one found). A low
"shape | colour" with a high "colour drawn" says the objects are there, in the right colours,
with the wrong outlines (docs/status.md).

For position prompts ("a photo of a red circle left of a blue square") it also asks whether the
relation is drawn, whatever the shapes: in the images holding both named colours, how often the
largest object of the first colour stands in the asked relation to the largest of the second
(GenEval's rule), and how often in the opposite one, also by the relation word. A generator
that ignores the relation draws both about equally often; one that follows the word order of
the training list captions (left to right) draws the asked relation for "left of" and the
opposite for "right of".
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def geneval_folder(path: Path) -> Path:
    path = path.expanduser()
    folder = path / "evaluation" / "geneval"
    if folder.is_dir():
        return folder
    if any(p.name == "metadata.jsonl" for p in path.glob("*/metadata.jsonl")):
        return path
    raise SystemExit(f"{path}: neither a run directory with evaluation/geneval nor a GenEval folder; "
                     "run the evaluation stage (blip3o-mini run) first")


def scored(folder: Path) -> list[tuple[dict, dict]]:
    """(GenEval-mini record, its prompt's metadata) for every image of the folder."""
    from blip3o_mini.evaluation.folder import read_geneval_folder
    from blip3o_mini.evaluation.score import score_folder

    metadata = {name: m for name, m, _ in read_geneval_folder(folder)}  # prompt folder -> its metadata
    return [(r, metadata[r["filename"].split("/")[0]]) for r in score_folder(folder, write=False).records]


def shape_given_colour(images: list[tuple[dict, dict]]) -> tuple[dict[str, Counter], Counter]:
    """Per tag: asked / colour drawn / colour and shape counts; and (asked, drawn) shape pairs,
    the drawn shape being the largest object's of the asked colour."""
    from blip3o_mini.evaluation import drawn_shape

    stats: dict[str, Counter] = defaultdict(Counter)
    confused: Counter = Counter()
    for record, meta in images:
        for req in meta["include"]:
            if "color" not in req:
                continue
            same_colour = [d for d in record["detections"] if d["color"] == req["color"]]
            s = stats[record["tag"]]
            s["asked"] += 1
            s["colour drawn"] += bool(same_colour)
            s["colour and shape"] += any(d["shape"] == req["class"] for d in same_colour)
            if same_colour:
                confused[(req["class"], drawn_shape(record["detections"], req))] += 1
    return dict(stats), confused


def relation_given_colours(images: list[tuple[dict, dict]]) -> Counter:
    """Position prompts: images with both named colours drawn, and how many of them draw the
    asked relation or its opposite between the largest object of each colour, in all and by
    the relation word ((word, count) keys); and how many draw the first-named object first
    (left, or upper) whatever the word says."""
    from blip3o_mini.data.text import INVERSE
    from blip3o_mini.evaluation import drawn_relation

    counts: Counter = Counter()
    for record, meta in images:
        if record["tag"] != "position":
            continue
        rels = drawn_relation(record["detections"], meta)
        if rels is None:
            continue
        rel = meta["include"][1]["position"][0]  # GenEval: "A rel B", A = include[1], B = include[0]
        for key in ("both colours", (rel, "both colours")):
            counts[key] += 1
        for key in ("asked", (rel, "asked")):
            counts[key] += rel in rels
        for key in ("opposite", (rel, "opposite")):
            counts[key] += INVERSE[rel] in rels
        # word order: the training list captions name objects left to right
        counts["named first, drawn first"] += ("left of" if rel in ("left of", "right of") else "above") in rels
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run directories or GenEval folders")
    args = p.parse_args()
    for path in args.runs:
        images = scored(geneval_folder(path))
        stats, confused = shape_given_colour(images)
        print(f"{path.name}: per object a prompt names with its colour")
        print(f"  {'tag':<12} {'asked':>5} {'colour drawn':>12} {'colour+shape':>12} {'shape | colour':>14}")
        for tag, s in stats.items():
            print(f"  {tag:<12} {s['asked']:>5} {s['colour drawn'] / s['asked']:>12.2f} "
                  f"{s['colour and shape'] / s['asked']:>12.2f} "
                  f"{s['colour and shape'] / max(1, s['colour drawn']):>14.2f}")
        drawn = Counter()
        for (asked, _), n in confused.items():
            drawn[asked] += n
        for asked in sorted(drawn):
            as_what = ", ".join(f"{shape} {confused[(asked, shape)] / drawn[asked]:.2f}"
                                for shape in sorted({s for a, s in confused if a == asked}))
            print(f"  asked {asked}: drawn as {as_what} (n={drawn[asked]})")
        rel = relation_given_colours(images)
        if rel["both colours"]:
            n = rel["both colours"]
            print(f"  position prompts with both colours drawn: {n}; the asked relation between them "
                  f"{rel['asked'] / n:.2f}, the opposite {rel['opposite'] / n:.2f}")
            words = [w for w in ("left of", "right of", "above", "below") if rel[(w, "both colours")]]
            print("  by the relation word: " + "; ".join(
                f"{w} ({rel[(w, 'both colours')]}) asked {rel[(w, 'asked')] / rel[(w, 'both colours')]:.2f}, "
                f"opposite {rel[(w, 'opposite')] / rel[(w, 'both colours')]:.2f}" for w in words))
            print(f"  the first-named object drawn first (left, or upper): {rel['named first, drawn first'] / n:.2f}")


if __name__ == "__main__":
    main()
