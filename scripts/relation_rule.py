"""Do the training captions' relations mean what GenEval's rule scores? Per relation rule.

    python scripts/relation_rule.py --config toy

A two-object ShapesWorld scene whose objects are apart by the margin is captioned with one
relation, "A left of B" and "B right of A" (`data.text.captions`); `world.relation`'s rule picks
it when both axes qualify (`world.RELATION_RULES`). GenEval-mini scores a generated pair with
GenEval's own rule (`evaluation.prompts.relative_position`), which holds a relation when the
centre offset points within about 60 degrees of its axis, so a steep diagonal pair is "above"
to GenEval. This script reads the training split's scenes (no images are rendered) and prints,
for each rule:

- how many pairs each relation word is said of (both orders of a caption counted), and in how
  many of them GenEval's rule holds the same word;
- the pairs GenEval's rule calls above / below, and how many of them the captions call so;
- a ceiling for GenEval-mini's position prompts: a generator that draws exactly the training
  layouts of the caption it is given places the pair right with probability P(GenEval holds the
  word | the caption says it); averaged over the position prompts' relation words, that is the
  most its position accuracy can be even with every shape and colour right.

The counting is `blip3o_mini.evaluation.caption_agreement`'s. It runs in a few seconds.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    from blip3o_mini.config import load_config
    from blip3o_mini.data import RELATION_RULES, relation, scene_at
    from blip3o_mini.data.world import RELATIONS
    from blip3o_mini.evaluation.caption_agreement import agreement, caption_relations, position_ceiling
    from blip3o_mini.evaluation.prompts import DEFAULT_PROMPTS_FILE, read_prompts, relative_position

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="toy", help="config whose seed and data.num_train name the split")
    p.add_argument("--num-train", type=int, default=None, help="scenes to read (default: the config's)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    seed, n = cfg.get("seed", 0), args.num_train or cfg.get("data", {}).get("num_train", 10000)
    scenes = [scene_at(seed, "train", i) for i in range(n)]
    pairs = [s.objects for s in scenes if len(s.objects) == 2]
    words = [e["position"][0] for m in read_prompts(DEFAULT_PROMPTS_FILE) if m["tag"] == "position"
             for e in m["include"] if "position" in e]
    upright = [bool(relative_position(a.bbox, b.bbox) & {"above", "below"}) for a, b in pairs]  # GenEval's rule
    vertical = sum(upright)
    print(f"{n} training scenes (seed {seed}), {len(pairs)} with two objects; GenEval's rule calls "
          f"{vertical} of those pairs above / below. GenEval-mini position prompts: "
          + ", ".join(f"{words.count(w)} {w}" for w in RELATIONS))
    for rule in RELATION_RULES:
        stated = caption_relations(scenes, rule)
        table = agreement(stated)
        said_upright = [relation(a, b, rule) in ("above", "below") for a, b in pairs]
        print(f"\nrelation_rule: {rule}")
        print(f"  {'word':<9} {'captions':>8} {'GenEval holds it':>17}")
        for w in RELATIONS:
            said, held = table.get(w, (0, 0))
            print(f"  {w:<9} {said:>8} {held:>8} ({held / max(said, 1):.3f})")
        both = sum(s and u for s, u in zip(said_upright, upright))
        print(f"  pairs captioned above / below: {sum(said_upright)}, {both} of them among the {vertical} "
              "GenEval's rule calls so")
        print(f"  position ceiling (GenEval-mini's position prompts, relation only): "
              f"{position_ceiling(stated, words):.3f}")


if __name__ == "__main__":
    main()
