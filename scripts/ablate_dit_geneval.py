"""GenEval-mini of fresh toy DiTs by training steps, with and without an exponential moving
average (EMA) of the weights, with closed or open cross-attention gates: is the generation stage
step-starved, would an EMA (as the decoder keeps) help, do the zero-initialised gates hold the
prompt back? (docs/status.md).

    python scripts/ablate_dit_geneval.py --run-dir ~/.cache/blip3o-mini/runs/toy --steps 1800 --decays 0.99 0.995
    python scripts/ablate_dit_geneval.py --run-dir ~/.cache/blip3o-mini/runs/toy --steps 5400 --score-at 1800 3600 --decays

With the decoder's warm-up (decay min(d, (1 + step) / (10 + step))) any d above 0.995 acts as
0.995 within 1800 steps.

As `ablate_dit_lr.py`, the condition Q of every training caption (all paraphrases) is computed
once with a finished run's queries and frozen backbone, so a step costs a DiT step only. One
fresh DiT trains with the toy stage's recipe (AdamW, or Muon for its blocks' matrices, warmup,
cosine decay over `--steps`, noise repeats, the stage's precision: bf16 autocast where the
config asks for it and the CPU has bf16) while EMA copies at each decay follow its weights. At
each `--score-at` step and at the end, each set of weights replaces the run pipeline's DiT and
generates the GenEval-mini prompts (the evaluation stage's prompts, seeds and sampling), which
the GenEval-mini detector scores. Scores at intermediate steps come from a schedule still mid-decay.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--decays", type=float, nargs="*", default=[0.99, 0.995])
    p.add_argument("--score-at", type=int, nargs="*", default=[], help="also score at these steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--min-lr", type=float, default=4e-4)
    p.add_argument("--time-sampling", default=None, help="override generation.flow.time_sampling")
    p.add_argument("--cross-gate-init", type=float, default=0.0,
                   help="start every block's cross-attention gate here (0: the paper's closed gates)")
    p.add_argument("--feature-norm", choices=["standardize", "whiten"], default=None,
                   help="override generation.feature_norm (the run's statistics, whitening measured here)")
    p.add_argument("--whiten-dims", type=int, default=None, help="with whiten: keep this many directions")
    p.add_argument("--whiten-power", type=float, default=None,
                   help="with whiten: divide each direction by variance ** this (0.5: unit variance)")
    p.add_argument("--cond-norm", choices=["none", "standardize", "whiten"], default=None,
                   help="override generation.cond_norm (its statistics fitted here, with the run's queries)")
    p.add_argument("--dit-dim", type=int, default=None, help="override generation.dit.dim")
    p.add_argument("--dit-depth", type=int, default=None, help="override generation.dit.depth")
    p.add_argument("--dit-patch", type=int, default=None, help="override generation.dit.patch_size")
    p.add_argument("--dit-pos-embed", choices=["none", "sincos"], default=None,
                   help="override generation.dit.pos_embed (sincos: absolute 2D positions added to the tokens)")
    p.add_argument("--dit-rope-theta", type=float, default=None,
                   help="override generation.dit.rope_theta (10000 as Lumina; on an 8x8 grid most of its "
                        "frequencies barely turn: a smaller base spreads them over the grid)")
    p.add_argument("--time-shift", type=float, default=None, help="override generation.flow.time_shift")
    p.add_argument("--contrastive", type=float, default=0.0,
                   help="contrastive flow matching's weight lambda (flow.FlowMatching.contrastive_weight): "
                        "a relation caption's negative is its scene with the objects' places swapped")
    p.add_argument("--contrastive-times", type=float, nargs=2, default=(0.0, 1.0),
                   help="the training times t (0 = noise) at which the contrastive term applies")
    p.add_argument("--relation-share", type=float, default=None,
                   help="draw this share of each batch from the captions that state a two-object scene's "
                        "relation, the rest from the others (unset: all captions alike, 26%% of them "
                        "relations; 1: relations alone): does the DiT learn the relation undiluted?")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the DiT blocks' matrices, AdamW for the rest (training/muon.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's training forward, as the stage does")
    p.add_argument("--seed", type=int, default=0, help="the DiT's initialisation and batch draws (training-seed spread)")
    p.add_argument("--save", type=Path, default=None, help="write the final DiT weights here (.safetensors)")
    p.add_argument("--images", type=Path, default=None,
                   help="keep each scored set of images here, in GenEval's layout (DIR/raw_1800/00000/...), "
                        "for scripts/shape_given_colour.py")
    p.add_argument("--q-cache", type=Path, default=None,
                   help="save/load the cached Q here (.safetensors, bf16; recomputed when the run's queries or backbone differ)")
    args = p.parse_args()

    from blip3o_mini.config import relation_rule
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
    from blip3o_mini.run import run_config, stage_attention_kernel

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    pipe = Blip3oMiniPipeline.from_run(run, SamplingConfig.from_config(cfg))
    directions = validation_directions(pipe, run)  # the run's whitening, measured once
    run_cond_norm = pipe.generator.cfg.cond_norm
    pipe.generator = with_overrides(pipe.generator, args, (directions["var"], directions["basis"]))
    if pipe.generator.cfg.cond_norm not in ("none", run_cond_norm):  # as the stage fits it
        fit_condition_norm(pipe, run, cfg)
    with stage_attention_kernel(cfg):  # the math SDPA kernel on CPU, as the stages run
        q, x, rows = cached_pairs(pipe, run, args.q_cache)
        pools = None
        if args.relation_share is not None:
            if not 0 <= args.relation_share <= 1:
                raise SystemExit(f"--relation-share {args.relation_share}: a share of the batch, in [0, 1]")
            import datasets

            stated = relation_captions(datasets.load_from_disk(str(run / "data" / "shapesworld"))["train"])  # (P,)
            pools = stated.nonzero()[:, 0], (~stated).nonzero()[:, 0], round(args.relation_share * args.batch_size)
            if (pools[2] and not len(pools[0])) or (pools[2] < args.batch_size and not len(pools[1])):
                raise SystemExit(f"--relation-share {args.relation_share}: {run / 'data'} has "
                                 f"{len(pools[0])} captions that state a relation and {len(pools[1])} others; "
                                 "use a share that draws only from a pool that has some")
            print(f"batches of {pools[2]} of the {len(pools[0])} captions that state a relation and "
                  f"{args.batch_size - pools[2]} of the other {len(pools[1])}", flush=True)
        negatives = relation_negatives(pipe.generator, run, relation_rule(cfg)) if args.contrastive > 0 else None
        results = train_and_score(pipe, q, x, rows, args, cfg, directions, negatives, pools)
    if args.save:
        from blip3o_mini.artifacts import save_tensors
        save_tensors(args.save, pipe.generator.dit.state_dict())  # the last weights scored
    print(json.dumps({k: round(v["overall"], 4) for k, v in results.items()}))


def with_overrides(gen, args, whitening: tuple):
    """The run's generator, or a copy whose features are normalised (and sampled) another way,
    whose DiT has another width, depth, patch size, position embedding or RoPE base, or whose flow uses another time shift; its queries are
    the run's. `whitening`: the principal variances and directions of the run's standardised
    training tokens."""
    import dataclasses

    from blip3o_mini.generation import Blip3oGenerator

    norm = args.feature_norm or gen.cfg.feature_norm
    dims = args.whiten_dims if args.whiten_dims is not None else gen.cfg.whiten_dims if norm == "whiten" else None
    flow = gen.cfg.flow | ({"time_shift": args.time_shift} if args.time_shift is not None else {})
    dit = gen.cfg.dit | {k: v for k, v in (("dim", args.dit_dim), ("depth", args.dit_depth),
                                           ("patch_size", args.dit_patch), ("pos_embed", args.dit_pos_embed),
                                           ("rope_theta", args.dit_rope_theta))
                             if v is not None}
    power = args.whiten_power if args.whiten_power is not None else gen.cfg.whiten_power if norm == "whiten" else 0.5
    cfg = dataclasses.replace(gen.cfg, feature_norm=norm, whiten_dims=dims, whiten_power=power, flow=flow, dit=dit,
                              cond_norm=args.cond_norm or gen.cfg.cond_norm)
    if cfg == gen.cfg:
        return gen
    new = Blip3oGenerator(cfg, gen.feature_dim, gen.dit_cfg.cond_dim, gen.feature_mean, gen.feature_std,
                          whitening if norm == "whiten" else None)
    new.queries = gen.queries
    if cfg.cond_norm == gen.cfg.cond_norm != "none":  # the statistics the run's generation stage fitted
        new.load_state_dict({k: v for k, v in gen.state_dict().items() if k.startswith("cond_")}, strict=False)
    return new


def fit_condition_norm(pipe, run: Path, cfg: dict) -> None:
    """Fit `--cond-norm`'s statistics on the run's training captions, with its queries, as the
    generation stage does (`generation_stage.condition_prompts`)."""
    from blip3o_mini.describe import generation_configs
    from blip3o_mini.generation_stage import run_condition_prompts

    seed = generation_configs(cfg)[1].seed
    pipe.generator.fit_condition_norm(pipe.backbone, run_condition_prompts(run, seed))


def validation_directions(pipe, run: Path) -> dict:
    """direction_fvu's inputs: 256 validation images, their captions and the principal
    directions of the run's standardised training tokens."""
    import datasets

    from blip3o_mini.features import load_split_features, measure_whitening

    gen = pipe.generator
    captions = [c[0] for c in datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"][:256]["captions"]]
    var, basis = measure_whitening(load_split_features(run / "clip", "train"), gen.feature_mean, gen.feature_std)
    return dict(features=load_split_features(run / "clip", "val")[:256], captions=captions,
                mean=gen.feature_mean, std=gen.feature_std, var=var, basis=basis)


def cached_pairs(pipe, run: Path, q_cache: Path | None):
    """Q (P, Nq, K) bf16 of every (caption paraphrase, image) pair, the CLIP features (N, 64, F)
    standardised as the generator trains on them, and each pair's image row (P,). The cache
    holds Q as the backbone returns it; `cond_norm` is applied after, so one cache serves all."""
    import datasets

    from safetensors import safe_open

    from blip3o_mini.artifacts import load_tensors, save_tensors
    from blip3o_mini.features import load_split_features

    gen, backbone = pipe.generator, pipe.backbone
    captions = datasets.load_from_disk(str(run / "data" / "shapesworld"))["train"]["captions"]
    rows = rows_of(captions)  # (P,)
    texts = [t for options in captions for t in options]
    t0 = time.perf_counter()
    key = condition_key(gen, backbone)
    cached = q_cache and q_cache.exists() and safe_open(str(q_cache), "pt").metadata().get("key") == key
    if cached:
        q = load_tensors(q_cache)["q"]
    else:  # no cache, or one made with other queries or another backbone
        with torch.no_grad():  # bf16 halves the memory of ~40k conditions
            q = gen.raw_condition(backbone, texts, chunk_size=500).bfloat16()
        if q_cache:
            save_tensors(q_cache, {"q": q}, metadata={"key": key})
    q = torch.cat([gen.normalize_condition(c.float()).bfloat16() for c in q.split(4096)])  # (P, Nq, K)
    x = gen.normalize(load_split_features(run / "clip", "train"))  # (N, 64, F)
    print(f"Q of {len(texts)} captions {'read from the cache' if cached else 'computed'} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return q, x, rows


def relation_negatives(gen, run: Path, rule: str) -> dict:
    """Contrastive flow matching's hard negatives: for every training image of two objects in a
    relation, the CLIP features (standardised as the generator trains on them) of the same scene
    with the objects' places swapped (`data.swap_places`), by the run's encoder. Returns the
    features (M, 64, F), each image row's negative (N,) (-1: none) and, for every (caption
    paraphrase, image) pair in `cached_pairs`' order, whether the caption states the relation (P,).
    `rule`: the run's `data.relation_rule`, by which its captions state the relation."""
    import datasets

    from blip3o_mini.data import relation, render, scene_of, swap_places
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.data.text import INVERSE
    from blip3o_mini.features import extract_features, load_encoder

    train = datasets.load_from_disk(str(run / "data" / "shapesworld"))["train"]
    scenes = [scene_of({"objects": r}) for r in train["objects"]]  # the graphs alone: no image decoding
    index, images = torch.full((len(scenes),), -1), []
    for r, scene in enumerate(scenes):
        if len(scene.objects) == 2 and (rel := relation(*scene.objects, rule)) is not None:
            swapped = swap_places(scene)
            if relation(*swapped.objects, rule) == INVERSE[rel]:  # 0.6% do not flip once kept inside the canvas
                index[r] = len(images)
                images.append(render(swapped))
    if not images:
        raise SystemExit(f"--contrastive: {run / 'data'} has no two-object training scenes in a relation to swap")
    pixels = images_uint8({"image": images})  # (M, 3, 64, 64), as the CLIP stage reads its split
    features = gen.normalize(extract_features(load_encoder(run / "clip"), pixels))  # (M, 64, F)
    stated = relation_captions(train) & (index[rows_of(train["captions"])] >= 0)  # (P,)
    print(f"negatives: {len(images)} two-object training scenes with their places swapped; "
          f"{int(stated.sum())} of {len(stated)} captions state the relation", flush=True)
    return dict(features=features, index=index, stated=stated)


def rows_of(captions: list[list[str]]) -> torch.Tensor:
    """Each (caption paraphrase, image) pair's image row, in `cached_pairs`' order: (P,)."""
    return torch.tensor([r for r, options in enumerate(captions) for _ in options])


def relation_captions(train) -> torch.Tensor:
    """For every (caption paraphrase, image) pair of the training split `train` in `cached_pairs`'
    order, whether its image holds two objects in a relation and the caption states it: (P,) bool."""
    from blip3o_mini.data import relation, scene_of
    from blip3o_mini.data.world import RELATIONS

    related = [len(sc.objects) == 2 and relation(*sc.objects) is not None
               for sc in (scene_of({"objects": r}) for r in train["objects"])]
    return torch.tensor([related[r] and any(w in text for w in RELATIONS)
                         for r, options in enumerate(train["captions"]) for text in options])


def condition_key(gen, backbone) -> str:
    """What Q depends on: the backbone's weights and the queries (the `--q-cache` file's key)."""
    from blip3o_mini.generation_stage import weights_hash

    return f"{weights_hash(backbone)}-{weights_hash(torch.nn.ParameterList([gen.queries]))}"


def train_and_score(pipe, q, x, rows, args, cfg, directions: dict, negatives: dict | None = None,
                    pools: tuple | None = None) -> dict:
    """Train a fresh DiT with the toy stage's recipe; GenEval-mini summaries by weights and step.
    With `negatives` (`relation_negatives`), the flow adds `--contrastive`'s term; with `pools`
    (relation captions, the others, how many of a batch from the first), `--relation-share`'s batches."""
    from blip3o_mini.dit import NextDiT
    from blip3o_mini.flow import FlowMatching
    from blip3o_mini.config import build
    from blip3o_mini.training.distributed import stage_trainer_config
    from blip3o_mini.training.ema import update_ema
    from blip3o_mini.training.muon import hidden_matrices, make_optimizer
    from blip3o_mini.training.generation import GenerationTrainConfig
    from blip3o_mini.training.schedule import cosine_with_warmup

    gen, results = pipe.generator, {}
    flow = FlowMatching(**{**gen.cfg.flow, **({"time_sampling": args.time_sampling} if args.time_sampling else {}),
                           **({"contrastive_weight": args.contrastive, "contrastive_times": tuple(args.contrastive_times)}
                              if negatives else {})})
    torch.manual_seed(args.seed)
    dit = NextDiT(gen.dit_cfg)
    with torch.no_grad():
        for block in dit.blocks:
            block.cross_gate.fill_(args.cross_gate_init)  # (H,): tanh(gate) scales the cross-attention
    emas = {d: copy.deepcopy(dit).requires_grad_(False) for d in args.decays}
    opt = make_optimizer(args.optimizer, [{"params": list(dit.parameters())}], hidden_matrices(dit.blocks),
                         "--optimizer", lr=args.lr, weight_decay=0.0)
    forward = torch.compile(dit.forward, dynamic=False) if args.compile else dit
    warmup = cfg["generation"].get("train", {}).get("warmup_steps", 100)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, warmup, args.steps, args.min_lr / args.lr))
    # The precision the stage's Trainer would use here (the trainer: section's wins; a bf16
    # recipe runs fp32 on CPUs without bf16 instructions).
    recipe = build(GenerationTrainConfig, cfg["generation"].get("train")).precision
    bf16 = stage_trainer_config(cfg, recipe).precision == "bf16-mixed"
    start = time.perf_counter()
    for step in range(args.steps):
        i = draw_batch(len(q), args.batch_size, pools)  # (B,) caption pairs
        extra = {}
        if negatives:
            j = negatives["index"][rows[i]]  # (B,): -1 where the image has none
            extra = dict(negatives=negatives["features"][j.clamp(min=0)], has_negative=negatives["stated"][i] & (j >= 0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = flow.loss(forward, x[rows[i]], q[i].float(), **extra).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        for d, e in emas.items():
            update_ema(e, dit, d, step)  # the decoder's EMA, warm-up included
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
        if step + 1 in args.score_at or step + 1 == args.steps:
            for name, weights in [("raw", dit)] + [(f"ema {d}", e) for d, e in emas.items()]:
                keep = args.images / f"{name}_{step + 1}".replace(" ", "") if args.images else None
                results[f"{name} @ {step + 1}"] = score(pipe, weights, f"{name} @ {step + 1}", cfg, directions, keep)
    return results


def draw_batch(n: int, batch_size: int, pools: tuple | None) -> torch.Tensor:
    """A batch of caption pairs (B,), drawn uniformly with replacement from all n, or k from the
    first pool and the rest from the second (`--relation-share`)."""
    if pools is None:
        return torch.randint(0, n, (batch_size,))
    first, second, k = pools
    return torch.cat([first[torch.randint(0, len(first), (k,))], second[torch.randint(0, len(second), (batch_size - k,))]])


def score(pipe, dit, name: str, cfg: dict, directions: dict, keep: Path | None = None) -> dict:
    """GenEval-mini of the pipeline with `dit`'s weights (the evaluation stage's prompts and
    seeds), and how well those weights predict each principal direction (direction_fvu).
    `keep`: write the images there instead of a temporary folder."""
    from blip3o_mini.config import build
    from blip3o_mini.evaluation import score_folder
    from blip3o_mini.evaluation.directions import direction_fvu
    from blip3o_mini.evaluation_stage import EvaluationConfig, write_evaluation_images

    pipe.generator.dit.load_state_dict(dit.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_evaluation_images(pipe, build(EvaluationConfig, cfg.get("evaluation", {})), keep or Path(tmp))
        s = score_folder(folder, write=False).summary()
    print(f"{name:>16}: GenEval-mini overall {s['overall']:.3f}  "
          + "  ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "overall" and v is not None), flush=True)
    for t, fvu in direction_fvu(pipe.generator, pipe.backbone, **directions).items():
        print(f"{'':>16}  FVU by direction at t {t}: " + "  ".join(f"{k} {v:.3f}" for k, v in fvu.items()))
    return s


if __name__ == "__main__":
    main()
