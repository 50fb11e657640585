"""How loud is each word of a prompt in the condition the DiT reads? Q raw, standardised per
dimension, and whitened (`generation.cond_norm`), measured on every GenEval-mini position prompt.

    python scripts/condition_loudness.py --run-dir runs/toy

For each position prompt ("a photo of a red circle left of a blue square") two edits: the
relation flipped ("... right of ...", "above" <-> "below") and the first colour changed. Each
edit's move of Q is given relative to the typical distance between the Q of two training
captions, so the three forms of Q compare on one scale. The statistics are fitted as the
generation stage fits them (`generation_stage.condition_prompts`, `Blip3oGenerator.
fit_condition_norm`), with the run's trained queries when the run has a generation stage and
the stage's seeded initial queries otherwise: the script needs only the understanding stage,
so it can decide `cond_norm` before the DiT is trained (docs/status.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def edits(prompts: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """(the position prompts, each with its relation flipped, each with its first colour changed)."""
    from blip3o_mini.data.text import INVERSE
    from blip3o_mini.data.world import COLORS

    base, flipped, recoloured = [], [], []
    for m in prompts:
        text = m["prompt"]
        rel = next(r for r in INVERSE if f" {r} " in text)
        first = next(e["color"] for e in m["include"] if "position" in e)  # the object the sentence starts with
        other = next(c for c in COLORS if c not in {e["color"] for e in m["include"]})
        base.append(text)
        flipped.append(text.replace(f" {rel} ", f" {INVERSE[rel]} "))
        recoloured.append(text.replace(f" {first} ", f" {other} ", 1))
    return base, flipped, recoloured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with a finished understanding stage")
    args = p.parse_args()

    import torch

    from blip3o_mini.describe import generation_configs
    from blip3o_mini.evaluation.prompts import compositions
    from blip3o_mini.generation import Blip3oGenerator
    from blip3o_mini.generation_stage import load_generator, run_condition_prompts
    from blip3o_mini.run import run_config, stage_attention_kernel
    from blip3o_mini.understanding_stage import load_stage_backbone

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    gen_cfg, train_cfg, _ = generation_configs(cfg)
    # Q alone: the features' scaling plays no part, so none of it (and one feature number) will do
    gen_cfg = dataclasses.replace(gen_cfg, feature_norm="none", whiten_dims=None, whiten_power=0.5)
    backbone = load_stage_backbone(run / "understanding").freeze()
    if (run / "generation" / "stage.json").exists():
        queries, source = load_generator(run / "generation").queries, "the run's trained queries"
    else:
        torch.manual_seed(train_cfg.seed)  # as generation_stage draws them
        queries = Blip3oGenerator(gen_cfg, 1, backbone.hidden_size).queries
        source = "the generation stage's initial queries"
    train_prompts = run_condition_prompts(run, train_cfg.seed)
    base, flipped, recoloured = edits(compositions("position"))
    print(f"{len(base)} position prompts; Q from {source}; statistics from {len(train_prompts)} training captions")
    rows = {}
    with stage_attention_kernel(cfg), torch.no_grad():
        # the backbone reads each prompt once; each norm is fitted and applied on the raw Q
        plain = Blip3oGenerator(gen_cfg, 1, backbone.hidden_size)
        plain.queries.data.copy_(queries)
        raw = {name: plain.raw_condition(backbone, texts, chunk_size=256)  # (P, Nq, K)
               for name, texts in (("base", base), ("flipped", flipped), ("recoloured", recoloured),
                                   ("train", train_prompts))}
        for norm in ("none", "standardize", "whiten"):
            gen = Blip3oGenerator(dataclasses.replace(gen_cfg, cond_norm=norm), 1, backbone.hidden_size)
            if norm != "none":
                gen.fit_condition_norm_on(raw["train"])
            q = {name: gen.normalize_condition(r).flatten(1) for name, r in raw.items()}  # (P, Nq*K)
            typical = torch.cdist(q["train"][:256], q["train"][256:512]).mean()  # two random captions' distance
            move = {k: float((q[k] - q["base"]).norm(dim=1).mean() / typical) for k in ("flipped", "recoloured")}
            rows[norm] = {"relation": round(move["flipped"], 3), "colour": round(move["recoloured"], 3),
                          "relation / colour": round(move["flipped"] / move["recoloured"], 3)}
            print(f"{norm:>12}: relation flipped moves Q {move['flipped']:.3f}, colour changed "
                  f"{move['recoloured']:.3f} (of two random captions' distance); ratio "
                  f"{move['flipped'] / move['recoloured']:.3f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
