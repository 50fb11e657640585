"""Does the trained DiT use the relation word? Its flow loss on real two-object images under the
true prompt, the prompt with the relation flipped, and other edits, at the same noise.

    python scripts/relation_loss_gap.py --run-dir runs/toy

For every validation scene of exactly two objects that stand in a relation (seen compositions;
both word orders, "A left of B" and "B right of A") the script computes the flow-matching loss
of the DiT on the image's own CLIP features, at the same (noise, t) draws, under:

- `true`: "a photo of a red circle left of a blue square", a training caption form;
- `relation flipped`: "... right of ..." (the image is now described wrongly in one word);
- `colours swapped`: "a photo of a blue circle left of a red square" (wrong attribution);
- `other scene`: the true prompt of another two-object scene (wrong everything);
- `null`: zeros, the classifier-free guidance null condition.

Each edit's extra loss over `true` is given as a share of the null condition's: how much of
what the prompt tells the DiT about this image the edit takes away. A DiT that draws the
relation it is asked loses a clear share when the relation flips; one that ignores the word
loses none. Rows by time bin (t = 0 is noise, where the layout is decided) and by axis
(left / right pairs, whose list caption also orders them left to right, and above / below).

At t = 0 the best possible loss is known: x_t is pure noise, so the best velocity is the mean
image of the prompt minus the noise, and its loss the images' spread around that mean. A second
table sets the DiT at t = 0 beside a linear model of that mean, least squares on the training
images, in the objects alone or in their roles (first = left / upper): what a predictor that
reads the relation would lose when it flips. `--ckpt` scores a checkpoint copied while the stage
trained, to follow the shares over training steps; `--dit` the weights of a DiT trained on the
run's queries by `scripts/ablate_dit_geneval.py --save`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blip3o_mini.data.world import DEFAULT_RELATION_RULE

EDITS = ("true", "relation flipped", "colours swapped", "other scene", "null")
T_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def relation_prompts(scene, rule: str = DEFAULT_RELATION_RULE) -> list[tuple[str, str, str]]:
    """(true, relation flipped, colours swapped) prompts of a two-object scene in a relation,
    in both word orders, the relation stated by `rule` as the run's captions state it
    (`data.relation_rule`); [] for any other scene."""
    from blip3o_mini.data.text import INVERSE, noun_phrase
    from blip3o_mini.data.world import relation

    if len(scene.objects) != 2 or relation(*scene.objects, rule) is None:
        return []
    out = []
    for a, b in (scene.objects, scene.objects[::-1]):
        rel = relation(a, b, rule)
        pa, pb = noun_phrase(1, a.shape, a.color), noun_phrase(1, b.shape, b.color)
        sa, sb = noun_phrase(1, a.shape, b.color), noun_phrase(1, b.shape, a.color)
        out.append((f"a photo of {pa} {rel} {pb}", f"a photo of {pa} {INVERSE[rel]} {pb}",
                    f"a photo of {sa} {rel} {sb}"))
    return out


def edit_conditions(gen, backbone, rows: list[tuple]) -> dict:
    """Q (n, Nq, K) of every prompt row (feature index, true, flipped, swapped) under each edit:
    the backbone reads each prompt once, whatever times the losses are then drawn at."""
    import torch

    n = len(rows)
    if len({r[0] for r in rows}) < 2:
        raise ValueError("needs two-object scenes in a relation from at least two images; "
                         "use a run whose data stage has more validation scenes")
    q = {name: gen.condition(backbone, [r[k] for r in rows], chunk_size=128)  # (n, Nq, K)
         for k, name in ((1, "true"), (2, "relation flipped"), (3, "colours swapped"))}
    shift = next(s for s in range(1, n) if all(rows[i][0] != rows[i - s][0] for i in range(n)))
    q["other scene"], q["null"] = q["true"].roll(shift, 0), torch.zeros_like(q["true"])  # another image's prompt
    return q


def edit_losses(gen, q: dict, rows: list[tuple], feats, draws: int, generator, t_fixed: float | None = None):
    """Flow loss (n, draws) of every prompt row under each edit's condition `q` (`edit_conditions`),
    all edits at the same (noise, t) per row and draw (t uniform, or `t_fixed`); those times t
    (n, draws); and how far each edit moves the prediction from the true prompt's, mean squared
    (n, draws): a measure that needs no target, so it reads alike for a DiT trained toward
    another one (contrastive flow matching)."""
    import torch

    from blip3o_mini.flow import interpolate, velocity_target

    n = len(rows)
    x1 = gen.normalize(feats[[r[0] for r in rows]].float())  # (n, 64, L)
    losses, moves = {e: torch.zeros(n, draws) for e in EDITS}, {e: torch.zeros(n, draws) for e in EDITS}
    times = torch.zeros(n, draws)
    for d in range(draws):
        x0 = torch.randn(x1.shape, generator=generator)  # (n, 64, L)
        t = torch.rand(n, generator=generator) if t_fixed is None else torch.full((n,), float(t_fixed))  # (n,)
        xt, vt = interpolate(x0, x1, t), velocity_target(x0, x1)  # (n, 64, L) each
        times[:, d] = t
        for s in range(0, n, 256):
            v = {e: gen.dit(xt[s:s + 256], t[s:s + 256], q[e][s:s + 256], None) for e in EDITS}  # (b, 64, L) each
            for e in EDITS:
                losses[e][s:s + 256, d] = (v[e] - vt[s:s + 256]).pow(2).mean(dim=(1, 2))
                moves[e][s:s + 256, d] = (v[e] - v["true"]).pow(2).mean(dim=(1, 2))
    return losses, times, moves


def pair_keys(scene, rule: str = DEFAULT_RELATION_RULE) -> dict[str, tuple]:
    """(first object, second object, axis) of a two-object scene in a relation, the first being the
    left / upper one as (colour, shape), under each edit of its prompt: as it is, the relation
    flipped (the objects' places swapped), and the colours swapped between the two shapes."""
    from blip3o_mini.data.world import relation

    a, b = scene.objects
    if relation(a, b, rule) in ("right of", "below"):
        a, b = b, a  # a is left of / above b
    axis = "horizontal" if relation(a, b, rule) == "left of" else "vertical"
    ka, kb = (a.color, a.shape), (b.color, b.shape)
    return {"true": (ka, kb, axis), "relation flipped": (kb, ka, axis),
            "colours swapped": ((b.color, a.shape), (a.color, b.shape), axis)}


def design(keys: list[tuple], placed: bool):
    """Rows of a linear model of the mean image: an intercept and, for each (colour, shape), its
    presence (`placed` False) or its role: first (left / upper) or second, on either axis. keys:
    (first object, second object, axis) -> (len(keys), 1 + 18 or 1 + 72)."""
    import torch

    from blip3o_mini.data.world import COLORS, SHAPES

    ids = {(c, s): i for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES)}
    x = torch.zeros(len(keys), 1 + len(ids) * (4 if placed else 1))
    x[:, 0] = 1
    for r, (a, b, axis) in enumerate(keys):
        for role, obj in enumerate((a, b)):
            slot = (2 * (axis == "vertical") + role) if placed else 0
            x[r, 1 + ids[obj] * (4 if placed else 1) + slot] = 1
    return x


def ridge_fit(x, y):
    """Least squares of y (M, P) on the design x (M, d), with a light ridge (1e-3 per row) so that
    a role no training image has stays at zero: the weights (d, P)."""
    import torch

    return torch.linalg.solve(x.T @ x + 1e-3 * len(x) * torch.eye(x.shape[1]), x.T @ y)


def linear_predictor_losses(train_x1, train_keys: list[dict], val_x1, val_keys: list[dict]) -> dict[str, float]:
    """At t = 0 the flow's best velocity is E[x_1 | prompt] - x_0, and its loss the spread of x_1
    around that mean. Model the mean image (64 x L numbers) as linear in the objects' presence
    ("objects only") or in their roles (first / second on the relation's axis), least squares on
    the training images, and score it on the validation images under each edit of their prompt;
    the null condition predicts the mean training image. Loss per element, averaged over images."""
    import torch

    y = train_x1.flatten(1)  # (M, 64 L)
    weights = {placed: ridge_fit(design([k["true"] for k in train_keys], placed), y) for placed in (False, True)}
    out = {"null": (val_x1 - train_x1.mean(0)).pow(2).mean().item()}
    for name, placed, edit in (("objects only", False, "true"), ("true", True, "true"),
                               ("relation flipped", True, "relation flipped"),
                               ("colours swapped", True, "colours swapped")):
        pred = design([k[edit] for k in val_keys], placed) @ weights[placed]  # (V, 64 L)
        out[name] = (val_x1.flatten(1) - pred).pow(2).mean().item()
    return out


def stage_generator(run: Path, cfg: dict, feature_dim: int, hidden_size: int, ckpt: Path | None = None):
    """The run's generator in eval mode: the finished stage's, or, with `ckpt` (a Lightning
    checkpoint copied while the stage trained), the one its config builds with the checkpoint's
    weights, so that a stage still training can be scored at its steps."""
    import torch

    from blip3o_mini.describe import generation_configs
    from blip3o_mini.generation import Blip3oGenerator
    from blip3o_mini.generation_stage import load_generator

    if (run / "generation" / "stage.json").exists():
        gen = load_generator(run / "generation").eval()
    elif ckpt:
        gen = Blip3oGenerator(generation_configs(cfg)[0], feature_dim, hidden_size).eval()
    else:
        raise SystemExit(f"{run / 'generation'} has not finished; pass --ckpt to score one of its checkpoints")
    if ckpt:  # the LightningModule holds the generator as `generator.` (and the frozen backbone)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        gen.load_state_dict({k.removeprefix("generator."): v for k, v in state["state_dict"].items()
                             if k.startswith("generator.")})
        print(f"weights of {ckpt} (step {state['global_step']})")
    return gen


def shares(mean: dict[str, float], edits) -> dict[str, float]:
    """Each edit's extra loss over the true prompt, as a share of the null condition's."""
    gap = mean["null"] - mean["true"]
    return {e: (mean[e] - mean["true"]) / gap if gap else float("nan") for e in edits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with finished generation and clip stages")
    p.add_argument("--draws", type=int, default=16, help="(noise, t) draws per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, help="a Lightning checkpoint of the run's generation stage "
                   "(RUN_DIR/generation/lightning-*/last.ckpt, copied during training) to score instead "
                   "of the finished stage's weights: the share over training steps")
    p.add_argument("--dit", type=Path, help="DiT weights (.safetensors) to score in the finished stage's generator "
                   "(its queries and feature statistics): `scripts/ablate_dit_geneval.py --save`")
    args = p.parse_args()

    import datasets
    import torch

    from blip3o_mini.config import relation_rule
    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.features import load_split_features
    from blip3o_mini.run import run_config, stage_attention_kernel
    from blip3o_mini.understanding_stage import load_stage_backbone

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    rule = relation_rule(cfg)  # the rule its captions were written with
    backbone = load_stage_backbone(run / "understanding").freeze()
    feats = load_split_features(run / "clip", "val")  # (V, 64, F)
    gen = stage_generator(run, cfg, feats.shape[-1], backbone.hidden_size, args.ckpt)
    if args.dit:
        from blip3o_mini.artifacts import load_tensors

        gen.dit.load_state_dict(load_tensors(args.dit))
        print(f"DiT weights of {args.dit}")
    data = datasets.load_from_disk(str(run / "data" / "shapesworld"))
    # the scene graphs alone: reading whole rows would decode every image
    val_scenes = [scene_of({"objects": r}) for r in data["val"]["objects"]]

    rows, axis = [], []  # (feature index, true, flipped, swapped); "horizontal" / "vertical"
    for i, scene in enumerate(val_scenes):
        if scene.unseen:
            continue
        for prompts in relation_prompts(scene, rule):
            rows.append((i, *prompts))
            axis.append(pair_keys(scene, rule)["true"][2])
    n = len(rows)
    print(f"{n} prompts from {n // 2} two-object validation scenes in a relation (seen compositions; "
          f"relation_rule {rule}), "
          f"{args.draws} (noise, t) draws each")

    with stage_attention_kernel(cfg), torch.no_grad():
        q = edit_conditions(gen, backbone, rows)
        losses, times, moves = edit_losses(gen, q, rows, feats, args.draws, torch.Generator().manual_seed(args.seed))
    results = {}
    horizontal = torch.tensor([a == "horizontal" for a in axis])[:, None].expand(n, args.draws)
    groups = [("all", torch.ones(n, args.draws, dtype=torch.bool)), ("left / right", horizontal),
              ("above / below", ~horizontal)]
    groups += [(f"t in [{lo:.2f}, {hi:.2f})", (times >= lo) & (times < hi)) for lo, hi in T_BINS]
    print("\nflow loss under each prompt (mean over prompts and draws); share = (loss - true) / (null - true)")
    print(f"| rows | draws | {' | '.join(EDITS)} | " + " | ".join(f"share: {e}" for e in EDITS[1:4]) + " |")
    print("|---" * (3 + len(EDITS) + 2) + "|")
    for name, mask in groups:
        mean = {e: losses[e][mask].mean().item() for e in EDITS}
        share = shares(mean, EDITS[1:4])
        print(f"| {name} | {int(mask.sum())} | " + " | ".join(f"{mean[e]:.4f}" for e in EDITS) + " | "
              + " | ".join(f"{v:.3f}" for v in share.values()) + " |")
        results[name] = {"draws": int(mask.sum()), "loss": mean, "share": share}
    print("\nhow far each edit moves the prediction from the true prompt's (mean squared), as a share of how far "
          "the null condition moves it: no target needed")
    print("| rows | " + " | ".join(f"moved: {e}" for e in EDITS[1:4]) + " |")
    print("|---" * 4 + "|")
    for name, mask in groups:
        null = moves["null"][mask].mean().item()
        moved = {e: moves[e][mask].mean().item() / null if null else float("nan") for e in EDITS[1:4]}
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in moved.values()) + " |")
        results[name]["moved"] = moved

    # At t = 0 (pure noise) the best loss under a prompt is known: the spread of x_1 around the mean
    # image of that prompt. A linear model of that mean, fitted on training images, is a predictor
    # the DiT could match there.
    with stage_attention_kernel(cfg), torch.no_grad():
        at0, _, _ = edit_losses(gen, q, rows, feats, 4, torch.Generator().manual_seed(args.seed), t_fixed=0.0)
        train_scenes = [scene_of({"objects": r}) for r in data["train"]["objects"]]
        keep = [i for i, sc in enumerate(train_scenes) if relation_prompts(sc, rule)]
        train_keys = [pair_keys(train_scenes[i], rule) for i in keep]
        train_x1 = gen.normalize(load_split_features(run / "clip", "train")[keep].float())  # (M, 64, L)
        scenes = sorted({r[0] for r in rows})
        ideal = linear_predictor_losses(train_x1, train_keys, gen.normalize(feats[scenes].float()),
                                      [pair_keys(val_scenes[i], rule) for i in scenes])
    dit = {e: at0[e].mean().item() for e in EDITS}
    print(f"\nat t = 0: the DiT (4 noise draws a prompt) against the mean of the training images that share "
          f"the prompt, modelled linearly ({len(keep)} two-object training images in a relation)")
    print("| predictor at t = 0 | null | objects only | true | relation flipped | colours swapped | "
          "share: relation flipped | share: colours swapped |")
    print("|---" * 8 + "|")
    for name, m in (("the DiT", dit), ("linear in the objects' roles", ideal)):
        share = shares(m, ("relation flipped", "colours swapped"))
        print(f"| {name} | {m['null']:.4f} | {m['objects only'] if 'objects only' in m else float('nan'):.4f} | "
              f"{m['true']:.4f} | {m['relation flipped']:.4f} | {m['colours swapped']:.4f} | "
              f"{share['relation flipped']:.3f} | {share['colours swapped']:.3f} |")
        results[f"t = 0, {name}"] = {"loss": m, "share": share}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
