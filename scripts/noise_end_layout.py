"""Can the DiT put an object in one half of the image from pure noise? Its guess of the clean
tokens at t = 0, averaged over noise, against the mean image of the prompt's training scenes.

    python scripts/noise_end_layout.py --run-dir runs/toy [--dit DIT.safetensors]
    python scripts/noise_end_layout.py --run-dir RUN_DIR --ckpt STEP.ckpt   # a stage still training

At t = 0 the flow's input is pure noise x_0, and the best prediction of the clean tokens,
x_0 + v, is the mean image of the prompt: E[x_1 | prompt]. For "a red circle left of a blue
square" that mean holds the circle's features in the left half and the square's in the right.
A DiT whose tokens know their places only through RoPE's relative positions is close to
translation-equivariant: shift the noise and its output shifts with it. Averaged over noise, such
a DiT's guess is the same at every place of the grid, so it cannot express that mean, however
much the loss pays for it; each single draw still puts objects somewhere, where the noise says.

For the two-object validation scenes in a relation (seen compositions, both word orders; the
prompts of `relation_loss_gap.py`) the script draws `--draws` noises per prompt at t = 0 and
measures, in the DiT's normalised feature space, per element:

- `layout of one draw`: how far one draw's guess varies across the 64 places (its spread
  around its own mean over the grid): does the DiT place anything from a given noise?
- `layout of the mean`: the same for the guess averaged over the draws, estimated without the
  draws' own scatter (the inner product of two halves' means, each centred over the grid);
- `mirror-asymmetric`: the part of the averaged guess that changes sign when the map is
  mirrored along the pair's axis (columns for left / right pairs, rows for above / below);
- `relation in the mean`: the squared difference between the averaged guesses under the true
  prompt and under the relation flipped, estimated the same way.

Beside them the same figures for the mean image as the linear models of `relation_loss_gap.py`
model it (least squares in the objects' roles, which knows the relation, and in the objects
alone, which does not), each fitted on the even and on the odd training images so that the
products of the two fits are not inflated by fitting noise. The DiT's layout of the mean, as a
share of the models', says how much of the prompt's mean layout it expresses; if it were near
zero while one draw's layout is large, the reading would hold: the layout would come from the
noise, not the prompt. Two regression coefficients follow: how far the DiT's change when the
relation flips goes along the roles model's (1: the model's relation, 0: none), and how far the
two word orders of one scene ("A left of B", "B right of A") differ as if the DiT drew the
first-named object first, as the training list captions name objects left to right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from relation_loss_gap import design, pair_keys, relation_prompts, ridge_fit, stage_generator  # noqa: E402


def grid_spread(x: torch.Tensor) -> torch.Tensor:
    """Per-element variance across the grid: (..., N, L) -> (...,), each map centred over N."""
    return (x - x.mean(dim=-2, keepdim=True)).pow(2).mean(dim=(-2, -1))


def split_half_product(a: torch.Tensor, centre: bool = True) -> torch.Tensor:
    """An estimate of |E a|^2 per element (E over the draws; each map centred over the grid, or
    not) that the draws' own scatter does not inflate: the inner product of the means of two
    disjoint halves of the draws. a: (n, draws, N, L) -> (n,)."""
    h = a.shape[1] // 2
    ma, mb = a[:, :h].mean(1), a[:, h:2 * h].mean(1)  # (n, N, L) each
    if centre:
        ma, mb = ma - ma.mean(dim=-2, keepdim=True), mb - mb.mean(dim=-2, keepdim=True)
    return (ma * mb).mean(dim=(-2, -1))


def noise_end_guesses(gen, q: torch.Tensor, draws: int, generator) -> torch.Tensor:
    """The DiT's guess of the clean tokens from pure noise, x_0 + v(x_0, t = 0, Q), for each
    prompt's condition q (n, Nq, K) and `draws` noises: (n, draws, N, L). The noise of draw d is
    the same for every prompt, so two conditions' guesses differ by the condition alone."""
    n, N, L = q.shape[0], gen.dit.cfg.grid ** 2, gen.dit.cfg.in_dim
    out = torch.zeros(n, draws, N, L)
    for d in range(draws):
        x0 = torch.randn(1, N, L, generator=generator).expand(n, N, L)  # (n, N, L)
        t = torch.zeros(n)
        for s in range(0, n, 256):
            out[s:s + 256, d] = x0[s:s + 256] + gen.dit(x0[s:s + 256], t[s:s + 256], q[s:s + 256], None)
    return out


def layout_figures(true: torch.Tensor, flipped: torch.Tensor, horizontal: torch.Tensor) -> dict[str, float]:
    """The figures of the module's docstring for guesses under the true and the flipped prompt,
    (n, draws, N, L) each (one draw for a deterministic predictor), averaged over prompts;
    horizontal (n,) bool: the pair's axis."""
    both, axis = torch.cat([true, flipped]), torch.cat([horizontal, horizontal])  # (2n, draws, N, L), (2n,)
    estimate = split_half_product if true.shape[1] > 1 else (
        lambda x, centre=True: grid_spread(x[:, 0]) if centre else x[:, 0].pow(2).mean(dim=(-2, -1)))
    return {"layout of one draw": grid_spread(both).mean().item() if true.shape[1] > 1 else float("nan"),
            "layout of the mean": estimate(both).mean().item(),
            "mirror-asymmetric": estimate((both - mirror(both, axis)) / 2, centre=False).mean().item(),
            "relation in the mean": estimate(true - flipped, centre=False).mean().item()}


def linear_means(train_x1: torch.Tensor, train_keys: list[dict], val_keys: list[dict]) -> dict[str, torch.Tensor]:
    """The mean image of each validation prompt as the linear models of `relation_loss_gap` predict
    it: in the objects' roles under the true and the flipped relation, and in the objects alone
    (the same for both). Each model is fitted twice, on the even and on the odd training images,
    so that its fitting noise, independent between the halves, cancels in the split-half
    products as the DiT's noise draws do: (V, 2, N, L) each."""
    out = {}
    for placed, edits in ((True, ("true", "relation flipped")), (False, ("objects only",))):
        fits = [ridge_fit(design([k["true"] for k in train_keys[half::2]], placed),  # (M/2, d)
                          train_x1[half::2].flatten(1))  # (d, N L)
                for half in (0, 1)]
        for e in edits:
            x = design([k["true" if e == "objects only" else e] for k in val_keys], placed)  # (V, d)
            out[e] = torch.stack([(x @ w).view(-1, *train_x1.shape[1:]) for w in fits], dim=1)  # (V, 2, N, L)
    return out


def along(d: torch.Tensor, d_model: torch.Tensor) -> float:
    """How far the DiT's change d (n, N, L) lies along the model's d_model (n, 2, N, L), two fits:
    a regression coefficient whose denominator, the product of the two fits, the fitting noise
    does not inflate. 1: the model's change, 0: none, < 0: the opposite."""
    return ((d * d_model.mean(1)).sum() / (d_model[:, 0] * d_model[:, 1]).sum()).item()


def mirror(x: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """Each map mirrored along its pair's axis: columns reversed for left / right pairs, rows for
    above / below. x (n, ..., N, L) on a square grid in raster order, horizontal (n,) bool."""
    side = int(round(x.shape[-2] ** 0.5))
    g = x.unflatten(-2, (side, side))  # (n, ..., G, G, L)
    out = torch.where(horizontal.view(-1, *[1] * (g.ndim - 1)), g.flip(-2), g.flip(-3))
    return out.flatten(-3, -2)


def word_order(mean_true: torch.Tensor, d_model: torch.Tensor, prompts: list[str], horizontal: torch.Tensor) -> dict:
    """Does the DiT draw the first-named object first (left, or upper), whatever the relation
    word says? The training list captions name objects left to right, so word order is a
    shortcut. Rows 2k and 2k + 1 are one scene in its two word orders ("A left of B", "B right
    of A"): a DiT that reads the relation draws them alike; one that follows the word order draws
    the second as the first's mirror, whose difference is the linear model's flip, signed
    (`d_model`, (n, 2, N, L), two fits). A regression coefficient on that difference, per axis:
    1 for pure word order, 0 for none. mean_true (n, N, L): the DiT's guesses averaged over
    noises (the same noises in every row)."""
    first_first = torch.tensor([("left of" in t or "above" in t) for t in prompts[::2]], dtype=torch.float32)
    sign = (2 * first_first - 1)[:, None, None, None]  # (n/2, 1, 1, 1): +1 when the first-named object is left / upper
    e = mean_true[0::2] - mean_true[1::2]  # (n/2, N, L)
    target = sign * d_model[0::2]  # (n/2, 2, N, L): what pure word order would make of e
    out = {}
    for name, keep in (("all", torch.ones_like(horizontal[0::2])), ("left / right", horizontal[0::2]),
                       ("above / below", ~horizontal[0::2])):
        if keep.any():
            out[name] = along(e[keep], target[keep])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True,
                   help="a run with finished clip and understanding stages, and a finished generation stage unless --ckpt")
    p.add_argument("--ckpt", type=Path, help="a Lightning checkpoint of the run's generation stage, copied while it "
                   "trained, to score instead of the finished stage's weights (as relation_loss_gap.py --ckpt)")
    p.add_argument("--dit", type=Path, help="DiT weights (.safetensors) to score in the finished stage's generator: "
                   "`scripts/ablate_dit_geneval.py --save`")
    p.add_argument("--dit-pos-embed", choices=["none", "sincos"], default=None,
                   help="with --dit: the position embedding those weights were trained with "
                        "(`ablate_dit_geneval.py --dit-pos-embed`; the stage's own by default)")
    p.add_argument("--draws", type=int, default=32, help="noises per prompt (split in halves for the means)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.draws < 2:
        raise SystemExit(f"--draws {args.draws}: needs at least 2 (the means are estimated from two halves)")

    import datasets

    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.features import load_split_features
    from blip3o_mini.run import run_config, stage_attention_kernel
    from blip3o_mini.understanding_stage import load_stage_backbone

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    backbone = load_stage_backbone(run / "understanding").freeze()
    train_feats = load_split_features(run / "clip", "train")  # (M, N, L): the linear models' images
    gen = stage_generator(run, cfg, train_feats.shape[-1], backbone.hidden_size, args.ckpt)
    if args.dit:
        import dataclasses

        from blip3o_mini.artifacts import load_tensors
        from blip3o_mini.dit import NextDiT

        if args.dit_pos_embed:  # the table is a buffer, not in the weights: the DiT is rebuilt with it
            gen.dit = NextDiT(dataclasses.replace(gen.dit.cfg, pos_embed=args.dit_pos_embed)).eval()
        gen.dit.load_state_dict(load_tensors(args.dit))
        print(f"DiT weights of {args.dit} (pos_embed {gen.dit.cfg.pos_embed})")
    elif args.dit_pos_embed:
        raise SystemExit("--dit-pos-embed describes --dit's weights; pass --dit too")
    data = datasets.load_from_disk(str(run / "data" / "shapesworld"))
    val_scenes = [scene_of({"objects": r}) for r in data["val"]["objects"]]
    rows = [(i, *pr) for i, sc in enumerate(val_scenes) if not sc.unseen for pr in relation_prompts(sc)]
    print(f"{len(rows)} prompts from {len(rows) // 2} two-object validation scenes in a relation, "
          f"{args.draws} noises each at t = 0")

    horizontal = torch.tensor([pair_keys(val_scenes[r[0]])["true"][2] == "horizontal" for r in rows])  # (n,)
    with stage_attention_kernel(cfg), torch.no_grad():
        q_true = gen.condition(backbone, [r[1] for r in rows], chunk_size=128)  # (n, Nq, K)
        q_flip = gen.condition(backbone, [r[2] for r in rows], chunk_size=128)
        guesses = {name: noise_end_guesses(gen, q, args.draws, torch.Generator().manual_seed(args.seed))
                   for name, q in (("true", q_true), ("flipped", q_flip), ("null", torch.zeros_like(q_true[:1])))}
    train_scenes = [scene_of({"objects": r}) for r in data["train"]["objects"]]
    keep = [i for i, sc in enumerate(train_scenes) if relation_prompts(sc)]
    train_x1 = gen.normalize(train_feats[keep].float())  # (M', N, L)
    # each row's mean image is its scene's: the word order does not change what is where
    lin = linear_means(train_x1, [pair_keys(train_scenes[i]) for i in keep],
                       [pair_keys(val_scenes[r[0]]) for r in rows])
    figures = {
        "the DiT": layout_figures(guesses["true"], guesses["flipped"], horizontal),
        # the two fits stand for two halves of draws; one fit's layout holds its fitting noise
        "mean image, linear in the objects' roles": {**layout_figures(
            lin["true"], lin["relation flipped"], horizontal), "layout of one draw": float("nan")},
        "mean image, linear in the objects alone": {**layout_figures(
            lin["objects only"], lin["objects only"], horizontal), "layout of one draw": float("nan")},
        "the DiT, null condition": layout_figures(guesses["null"], guesses["null"], horizontal[:1]),
    }
    d_model = lin["true"] - lin["relation flipped"]  # (n, 2, N, L)
    relation_along = along((guesses["true"] - guesses["flipped"]).mean(1), d_model)
    assert all(rows[k][0] == rows[k + 1][0] for k in range(0, len(rows), 2))  # one scene's two word orders
    order = word_order(guesses["true"].mean(1), d_model, [r[1] for r in rows], horizontal)
    real = grid_spread(train_x1).mean().item()

    print("\nper element, in the DiT's normalised feature space (a training image's own layout: "
          f"{real:.4f})")
    cols = ("layout of one draw", "layout of the mean", "mirror-asymmetric", "relation in the mean")
    print("| predictor at t = 0 | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, m in figures.items():
        print(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    roles = figures["mean image, linear in the objects' roles"]
    shares = {c: figures["the DiT"][c] / roles[c] for c in cols[1:]}
    print("\nthe DiT against the mean image linear in the roles: " + ", ".join(f"{c} {v:.3f}" for c, v in shares.items())
          + f"; its relation lies {relation_along:.3f} of the way along the model's")
    print("the DiT's guesses for the two word orders of one scene differ as if it drew the first-named object "
          "first (left or upper) " + ", ".join(f"{v:.3f} of the way ({k})" for k, v in order.items()))
    print(json.dumps({"figures": figures, "share": shares, "along": relation_along, "word order": order,
                      "real image layout": real}))


if __name__ == "__main__":
    main()
