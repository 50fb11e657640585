"""Does the understanding backbone compare two objects' places, or read one? Asks a finished
run's backbone the direction turns (`data.text.direction_turns`: "where is the red circle from
the blue square?" -> left / right / above / below), the position turns and the relation
questions of validation scenes of seen compositions, and sets the direction accuracy beside what
a reader of one object's place, or of both objects' halves, would score.

    python scripts/direction_probe.py runs/toy-vqa RUN_DIR2 ... [--scenes 300]

Direction and position answers mean something only for a backbone trained with those turns
(`understanding.train.direction_turns`, `position_turns`). A backbone that answers directions
at the one-object score has not learned to read the second object (docs/status.md, "Direction
turns").
"""

from __future__ import annotations

import argparse
from pathlib import Path


def one_object_guesses(scene, turns) -> tuple[list[str], list[str]]:
    """For each direction turn: the answer from the first object's half of the image alone, and
    from both objects' halves (horizontal if they differ there, else vertical, else the first's)."""
    from blip3o_mini.data.text import _named
    from blip3o_mini.data.world import IMAGE_SIZE

    names = {f"the {o.color} {o.shape}": o for o in _named(scene)}
    half = lambda o: ("left" if o.center[0] < IMAGE_SIZE / 2 else "right",  # noqa: E731
                      "above" if o.center[1] < IMAGE_SIZE / 2 else "below")
    one, both = [], []
    for q, _ in turns:
        a, b = (names[n] for n in q.removeprefix("where is ").removesuffix("?").split(" from "))
        (ha, va), (hb, vb) = half(a), half(b)
        one.append(ha)
        both.append(ha if ha != hb else va if va != vb else ha)
    return one, both


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+", help="runs whose understanding stage is done")
    p.add_argument("--scenes", type=int, default=300, help="validation scenes to ask about (seen ones kept)")
    args = p.parse_args()

    import datasets

    from blip3o_mini.config import relation_rule
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.text import direction_turns, position_turns
    from blip3o_mini.evaluation.vqa import answer_pairs
    from blip3o_mini.features import load_split_features
    from blip3o_mini.run import run_config
    from blip3o_mini.understanding_stage import load_understanding

    for run in (d.expanduser() for d in args.run_dirs):
        backbone = load_understanding(run)
        # the relation rule the run's text was written with (data.relation_rule), so the turns match it
        rule = relation_rule(run_config(run))
        columns = ["questions", "answers", "question_types", "objects", "unseen"]
        rows = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"].select_columns(columns)
        rows = rows.select(range(min(args.scenes, len(rows)))).to_list()
        features = load_split_features(run / "clip", "val")  # (N, 64, D)
        asked: dict[str, list[tuple[int, str, str]]] = {"direction": [], "position": [], "relation": []}
        one, both = [], []
        for i, row in enumerate(rows):
            if row["unseen"]:
                continue
            scene = scene_of(row)
            turns = direction_turns(scene, rule)
            guesses = one_object_guesses(scene, turns)
            one += guesses[0]
            both += guesses[1]
            asked["direction"] += [(i, q, a) for q, a in turns]
            asked["position"] += [(i, q, a) for q, a in position_turns(scene)]
            asked["relation"] += [(i, q, a) for q, a, t in zip(row["questions"], row["answers"], row["question_types"])
                                  if t == "relation"]
        scores = {}
        for kind, items in asked.items():
            answers = answer_pairs(backbone.answer_features, features, [(i, q) for i, q, _ in items], 64, 4)
            scores[kind] = sum(got == a for got, (_, _, a) in zip(answers, items)) / len(items)
        truth = [a for _, _, a in asked["direction"]]
        one_score = sum(g == a for g, a in zip(one, truth)) / len(truth)
        both_score = sum(g == a for g, a in zip(both, truth)) / len(truth)
        print(f"{run.name}: direction {scores['direction']:.3f} ({len(truth)} turns; one object's half "
              f"{one_score:.3f}, both objects' halves {both_score:.3f}), position {scores['position']:.3f}, "
              f"relation {scores['relation']:.3f} ({len(asked['relation'])} questions)")


if __name__ == "__main__":
    main()
