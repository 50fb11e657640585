"""Where do the colour answers on unseen compositions go wrong? Asks a finished run's backbone
the colour questions of validation scenes that hold a held-out colour+shape pair (purple
triangle, orange circle, green square), split by whether the asked object is itself held out,
and sorts the wrong answers: another object's colour in the same scene (the answer read off the
wrong token), or a colour the scene does not show.

    python scripts/unseen_colour.py runs/toy runs/toy-no-aids ... [--scenes 1000]

Colour on unseen compositions fell from 0.55-0.60 to 0.44-0.47 when the grid tables started at
sin-cos x 0.25 (docs/status.md, "Sin-cos grid positions at a quarter scale"); this says which
objects lose it and where their answers go.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def colour_items(rows: list[dict]) -> list[tuple[int, str, str, bool, set[str]]]:
    """(scene index, question, answer, asked object held out, the other objects' colours) for
    every colour question of the unseen scenes."""
    from blip3o_mini.data import HELD_OUT
    from blip3o_mini.data.dataset import scene_of

    items = []
    for i, row in enumerate(rows):
        if not row["unseen"]:
            continue
        scene = scene_of(row)
        for q, a, t in zip(row["questions"], row["answers"], row["question_types"]):
            if t == "color":
                shape = q.removeprefix("what color is the ").removesuffix("?")
                others = {o.color for o in scene.objects if o.shape != shape}
                items.append((i, q, a, (a, shape) in HELD_OUT, others))
    return items


def sort_answers(items, answers: list[str], held: bool) -> tuple[int, float, float, float]:
    """(questions, right, wrong with another object's colour, wrong with a colour the scene
    lacks) over the items whose asked object is (`held`) or is not a held-out pair."""
    group = [(got, it) for got, it in zip(answers, items) if it[3] == held]
    right = sum(got == it[2] for got, it in group)
    other = sum(got != it[2] and got in it[4] for got, it in group)
    n = max(len(group), 1)
    return len(group), right / n, other / n, (len(group) - right - other) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+", help="runs whose understanding stage is done")
    p.add_argument("--scenes", type=int, default=1000, help="validation scenes to read (unseen ones kept)")
    args = p.parse_args()

    import datasets

    from blip3o_mini.evaluation.vqa import answer_pairs
    from blip3o_mini.features import load_split_features
    from blip3o_mini.understanding_stage import load_understanding

    print(f"{'run':<14}{'asked object':<14}{'questions':>10}{'right':>8}"
          f"{'wrong: another object':>23}{'wrong: not in scene':>21}")
    for run in (d.expanduser() for d in args.run_dirs):
        backbone = load_understanding(run)
        columns = ["questions", "answers", "question_types", "objects", "unseen"]
        rows = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"].select_columns(columns)
        items = colour_items(rows.select(range(min(args.scenes, len(rows)))).to_list())
        features = load_split_features(run / "clip", "val")  # (N, 64, D)
        answers = answer_pairs(backbone.answer_features, features, [it[:2] for it in items], 64, 4)
        for held in (True, False):
            n, right, other, absent = sort_answers(items, answers, held)
            print(f"{run.name:<14}{'held out' if held else 'seen pair':<14}{n:>10}{right:>8.3f}{other:>23.3f}"
                  f"{absent:>21.3f}")


if __name__ == "__main__":
    main()
