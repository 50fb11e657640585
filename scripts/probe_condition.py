"""Does the condition Q say which object goes where, and which colour goes with which shape?

    python scripts/probe_condition.py --run-dir ~/.cache/blip3o-mini/runs/toy

GenEval-mini's position and colour-attribution prompts name two objects. To draw them the DiT
needs more from Q than the words: which of the two is on the left (or on top), and which colour
belongs to which shape. This script reads those back from Q with probes, on every distinct
prompt of the two tags (GenEval-mini's own templates; held-out compositions included):

- position prompts ("a photo of a red circle left of a blue square"): the colour and the shape of
  the object on the left (horizontal relations) or on top (vertical ones);
- colour-attribution prompts ("a photo of a red circle and a blue square"): the colour of the
  circle, of the square, of the triangle (each over the prompts naming that shape).

Each label is read by a linear probe (ridge regression, 5-fold cross-validated over prompts)
from:

- Q from the trained queries (the generation stage's), mean and last query concatenated as in
  notebook 05, and all the queries flattened;
- Q from random queries (std 0.02, as the stage initialises them);
- the prompt's words as an unordered bag, the control: "a red circle left of a blue square" and
  "a blue square left of a red circle" give it the same features and opposite labels, so no
  probe on it can beat 0.5 (the better of the two named colours) where reading the binding
  gives 1.0.

Near 1.0 says Q makes the binding explicit, and a DiT has it to draw from; near the bag of
words says the frozen backbone does not bind, and no DiT can draw positions or attributions
from its Q (docs/status.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def position_labels(meta: dict) -> dict[str, tuple[str, str]]:
    """`{"left" or "top": (colour, shape)}` of a GenEval-mini position prompt's metadata."""
    reference, anchored = meta["include"]  # GenEval: include[1] is A, "A rel B", B = include[0]
    rel = anchored["position"][0]
    first = anchored if rel in ("left of", "above") else reference  # the one on the left / on top
    key = "left" if rel in ("left of", "right of") else "top"
    return {key: (first["color"], first["class"])}


def attribution_labels(meta: dict) -> dict[str, str]:
    """`{shape: its colour}` of a colour-attribution prompt's metadata."""
    return {req["class"]: req["color"] for req in meta["include"]}


def bag_of_words(prompts: list[str]):
    import torch

    vocab = sorted({w for p in prompts for w in p.split()})
    bags = torch.zeros(len(prompts), len(vocab))  # (P, V) word counts, order thrown away
    for i, p in enumerate(prompts):
        for w in p.split():
            bags[i, vocab.index(w)] += 1
    return bags


def cross_validated(x, labels: list[str], folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of a ridge probe from `x` (P, D) to `labels`; the ridge strength
    is picked on a quarter of each training fold."""
    import torch

    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # (P, D) standardised
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))

    def fit_predict(tr, te, lam):
        Y = torch.nn.functional.one_hot(y[tr], len(classes)).double()  # (n, C)
        a = torch.cat([x[tr], torch.ones(len(tr), 1)], 1).double()     # (n, D + 1)
        b = torch.cat([x[te], torch.ones(len(te), 1)], 1).double()     # (m, D + 1)
        W = a.T @ torch.linalg.solve(a @ a.T + lam * torch.eye(len(tr), dtype=a.dtype), Y)  # (D + 1, C), dual form: D >> n
        return (b @ W).argmax(1)

    correct = 0
    for f in range(folds):
        te = order[f::folds]
        tr = torch.cat([order[g::folds] for g in range(folds) if g != f])
        inner, val = tr[len(tr) // 4:], tr[:len(tr) // 4]
        lam = max((1e-1, 1.0, 10.0, 100.0, 1000.0), key=lambda lam: (fit_predict(inner, val, lam) == y[val]).float().mean().item())
        correct += int((fit_predict(tr, te, lam) == y[te]).sum())
    return correct / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with a finished generation stage")
    p.add_argument("--seed", type=int, default=0, help="the random queries' seed and the folds'")
    args = p.parse_args()

    import torch

    from blip3o_mini.evaluation.prompts import compositions
    from blip3o_mini.features import load_encoder
    from blip3o_mini.generation_stage import load_generator, trained_generator_dir
    from blip3o_mini.understanding_stage import load_stage_backbone

    run = args.run_dir.expanduser()
    backbone = load_stage_backbone(run / "understanding", encoder=load_encoder(run / "clip"))
    queries = load_generator(trained_generator_dir(run)).queries.detach()  # (Nq, K)
    random_queries = torch.randn(queries.shape, generator=torch.Generator().manual_seed(args.seed)) * 0.02

    tasks: dict[str, tuple[list[str], list[str]]] = {}  # name -> (prompts, labels)
    for meta in compositions("position"):
        for key, (colour, shape) in position_labels(meta).items():
            for what, label in (("colour", colour), ("shape", shape)):
                prompts, labels = tasks.setdefault(f"position: the {key} object's {what}", ([], []))
                prompts.append(meta["prompt"])
                labels.append(label)
    for meta in compositions("color_attr"):
        for shape, colour in attribution_labels(meta).items():
            prompts, labels = tasks.setdefault(f"colour attribution: the {shape}'s colour", ([], []))
            prompts.append(meta["prompt"])
            labels.append(colour)

    every = sorted({p for prompts, _ in tasks.values() for p in prompts})
    with torch.no_grad():
        states = {name: backbone.query_states(every, q).float()  # (P, Nq, K)
                  for name, q in (("trained", queries), ("random", random_queries))}
    reps = {"Q trained, mean+last": torch.cat([states["trained"].mean(1), states["trained"][:, -1]], 1),
            "Q trained, all queries": states["trained"].flatten(1),
            "Q random, all queries": states["random"].flatten(1),
            "bag of words": bag_of_words(every)}
    index = {p: i for i, p in enumerate(every)}
    results: dict[str, dict[str, float]] = {}
    print(f"{len(every)} prompts; held-out accuracy of a linear probe (5-fold cross-validated)")
    print(f"  {'label':<50} " + " ".join(f"{r:>20}" for r in reps))
    for task, (prompts, labels) in tasks.items():
        rows = torch.tensor([index[p] for p in prompts])
        results[task] = {r: round(cross_validated(x[rows], labels, seed=args.seed), 3) for r, x in reps.items()}
        print(f"  {task + f' (n={len(prompts)})':<50} " + " ".join(f"{a:>20.3f}" for a in results[task].values()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
