"""What a toy understanding training step costs, eager and with the LM compiled.

    python benchmarks/bench_understanding_step.py                 # toy config, CPU, as the stage runs
    python benchmarks/bench_understanding_step.py --compile       # also the step with the LM compiled (understanding.train.compile)
    python benchmarks/bench_understanding_step.py --config toy-vqa --batches 8

The step is the understanding stage's (`blip3o_mini.training.understanding.UnderstandingModule`):
the toy backbone of the config (projector + Qwen3-style LM, random weights: the cost does not
depend on them), packed rows of ShapesWorld turns (`training.packing`) over random CLIP tokens
of the right shape, the stage's precision and attention kernel, AdamW. Rows differ in length,
so a batch's length T varies from step to step: the compiled forward is built with dynamic
shapes (one graph for every T). Times are medians over `--rounds` passes through `--batches`
distinct batches, after a warm-up pass (which, compiled, pays the compilation). A profiled
eager pass over the batches then gives the share of the step in matrix products and their FLOPs
(`matmul_profile.py`): with the step count, the arithmetic a stage cannot train in less of.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from compile_timing import summarize  # benchmarks/compile_timing.py
from matmul_profile import matmul_profile, print_matmul_profile  # benchmarks/matmul_profile.py


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="toy")
    p.add_argument("--batches", type=int, default=6, help="distinct batches (row lengths differ)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--compile", action="store_true",
                   help="also time the step with the LM compiled (understanding.train.compile)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from blip3o_mini.backbone import BackboneConfig, ToyBackbone
    from blip3o_mini.config import build, load_config
    from blip3o_mini.data.dataset import generate_split
    from blip3o_mini.run import stage_attention_kernel
    from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts
    from blip3o_mini.training.distributed import recipe_precision_here
    from blip3o_mini.training.packing import Packer
    from blip3o_mini.training.understanding import (PackedConversations, UnderstandingModule,
                                                    UnderstandingTrainConfig, collate, conversation)
    from blip3o_mini.understanding_stage import UnderstandingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    ucfg = build(UnderstandingConfig, cfg.get("understanding", {}))
    train_cfg = build(UnderstandingTrainConfig, ucfg.train)
    precision = recipe_precision_here(train_cfg.precision, "cpu")
    B = train_cfg.batch_size
    split = generate_split(0, "train", B * args.batches)
    rows = split.to_list()
    tokenizer = build_tokenizer(shapesworld_texts(rows, train_cfg.position_turns), vocab_size=ucfg.vocab_size)
    bcfg = build(BackboneConfig, (ucfg.backbone or {}) | {"vision_dim": 128, "num_image_tokens": 64})
    torch.manual_seed(0)
    features = torch.randn(len(rows), 64, 128)  # (N, 64, D): stands in for the CLIP stage's tokens
    packer = Packer(tokenizer, 64)
    turns = lambda r: conversation(r, positions=train_cfg.position_turns, relations=train_cfg.relation_turns,  # noqa: E731
                                   counts=train_cfg.count_turns)
    data = PackedConversations(features, rows, packer, turns)
    batches = [collate([data[i] for i in range(k * B, (k + 1) * B)], tokenizer.pad_token_id)
               for k in range(args.batches)]

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def stepper(module: UnderstandingModule):
        module.log = lambda *a, **k: None  # no Trainer here to log to
        opt = module.configure_optimizers()["optimizer"]

        def step(batch) -> None:  # the recipe's training_step: with `compile` it compiles the LM first
            with autocast():
                loss = module.training_step(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step

    def timed(module: UnderstandingModule, label: str) -> list[float]:
        step = stepper(module)
        start = time.perf_counter()
        for batch in batches:  # warm-up: every length once (and the compilation)
            step(batch)
        print(f"{label}: warm-up pass over {len(batches)} batches {time.perf_counter() - start:.0f} s", flush=True)
        times = []
        for _ in range(args.rounds):
            for batch in batches:
                start = time.perf_counter()
                step(batch)
                times.append(time.perf_counter() - start)
        return times

    results = {}
    with stage_attention_kernel(cfg):
        torch.manual_seed(0)
        eager = dataclasses.replace(train_cfg, compile=False, print_every=0)
        module = UnderstandingModule(ToyBackbone(bcfg, tokenizer), eager)
        results["eager"] = timed(module, "eager")
        step = stepper(module)
        profiled = matmul_profile([lambda b=b: step(b) for b in batches])  # one step per distinct batch
        if args.compile:
            torch.manual_seed(0)
            compiled = dataclasses.replace(eager, compile=True)
            results["compiled"] = timed(UnderstandingModule(ToyBackbone(bcfg, tokenizer), compiled), "compiled")
    lengths = [b["input_ids"].shape[1] for b in batches]
    out = {"config": args.config, "batch": B, "precision": precision, "threads": torch.get_num_threads(),
           "row_lengths": f"{min(lengths)}-{max(lengths)}", **profiled}
    print(f"understanding step ({args.config}), batch {B}, rows of {out['row_lengths']} tokens, {precision}, "
          f"{out['threads']} thread(s)")
    print_matmul_profile(out)
    return summarize(results, out)


if __name__ == "__main__":
    main()
