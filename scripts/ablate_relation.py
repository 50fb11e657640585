"""Can the toy understanding LM learn "is the red circle left of the blue square?"

The understanding stage answers relation questions at chance (docs/status.md)
while it learns the other four types. This script trains a fresh toy backbone on the relation
turns alone (one per training image that has one), so nothing else competes for its steps, and
can add two helps:

- `--grid-positions`: learned row and column embeddings on the image tokens
  (`BackboneConfig.grid_positions`), so each token's value says where it is;
- `--where`: single-object position turns as a stepping stone (`data.text.position_turns`:
  "where is the red circle?" -> left / right of the image's middle, "how high is the red
  circle?" -> above / below it), one attention hop instead of the relation's two.

It prints the loss every 100 steps, then the relation accuracy on the validation scenes (seen
and unseen) and, with `--where`, the accuracy on validation position turns.

    python scripts/ablate_relation.py --run-dir ~/.cache/blip3o-mini/runs/toy --steps 2000 --grid-positions
    python scripts/ablate_relation.py --run-dir ~/.cache/blip3o-mini/runs/toy --steps 2000 --grid-positions --where
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from blip3o_mini.data.dataset import scene_of
from blip3o_mini.data.text import position_turns


def relation_turns(row: dict, where: bool) -> list[tuple[str, str]]:
    j = row["question_types"].index("relation")
    return (position_turns(scene_of(row)) if where else []) + [(row["questions"][j], row["answers"][j])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run whose data and clip stages are done")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--grid-positions", action="store_true")
    p.add_argument("--where", action="store_true", help="add single-object position turns")
    p.add_argument("--threads", type=int, default=None, help="CPU threads while training")
    args = p.parse_args()

    import datasets

    from blip3o_mini.backbone import BackboneConfig, ToyBackbone
    from blip3o_mini.evaluation.vqa import answer_pairs, vqa_accuracy
    from blip3o_mini.features import load_encoder, load_split_features
    from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts
    from blip3o_mini.training.understanding import UnderstandingTrainConfig, train_understanding

    run = args.run_dir.expanduser()
    ds = datasets.load_from_disk(str(run / "data" / "shapesworld"))
    rows = ds["train"].select_columns(["captions", "questions", "answers", "question_types", "objects"]).to_list()
    keep = [i for i, r in enumerate(rows) if "relation" in r["question_types"]]
    features = load_split_features(run / "clip", "train")[keep]  # (R, 64, D)
    tokenizer = build_tokenizer(shapesworld_texts(rows, positions=args.where))
    torch.manual_seed(0)
    backbone = ToyBackbone(BackboneConfig(vision_dim=features.shape[-1], num_image_tokens=features.shape[1],
                                          grid_positions=args.grid_positions), tokenizer)
    cfg = UnderstandingTrainConfig(max_steps=args.steps, print_every=100, num_threads=args.threads)
    print(f"{len(keep)} training images with a relation turn; grid positions {args.grid_positions}, "
          f"where turns {args.where}")
    with tempfile.TemporaryDirectory() as ckpt:
        result = train_understanding(backbone, features, [rows[i] for i in keep], cfg, ckpt,
                                     turns=lambda r: relation_turns(r, args.where))
    print(f"trained {result.steps} steps in {result.seconds:.0f} s, final loss {result.loss_history[-1][1]:.3f}")

    backbone.encoder = load_encoder(run / "clip").requires_grad_(False).eval()
    res = vqa_accuracy(backbone, ds["val"])
    seen, unseen = res.to_metrics()["vqa_accuracy_relation"], res.to_metrics()["vqa_accuracy_relation_unseen"]
    print(f"relation accuracy: {seen:.3f} seen, {unseen:.3f} unseen (chance 0.5)")
    if args.where:
        val = ds["val"].select_columns(["objects"]).to_list()
        turns = [(i, q, a) for i, r in enumerate(val) for q, a in position_turns(scene_of(r))]
        val_features = load_split_features(run / "clip", "val")
        answers = answer_pairs(backbone.answer_features, val_features, [(i, q) for i, q, _ in turns], 256, 4)
        correct = sum(got == a for got, (_, _, a) in zip(answers, turns))
        print(f"position turns: {correct / len(turns):.3f} of {len(turns)} (chance 0.5)")


if __name__ == "__main__":
    main()
