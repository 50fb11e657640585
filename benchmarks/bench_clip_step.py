"""Where a toy CLIP training step spends its time: the vision tower, the text tower, AdamW.

    python benchmarks/bench_clip_step.py                  # toy config, CPU, as the clip stage runs
    python benchmarks/bench_clip_step.py --batch 64 --json clip_step.json
    python benchmarks/bench_clip_step.py --precision bf16-mixed    # force bf16 (emulated on CPUs without it)
    python benchmarks/bench_clip_step.py --adamw per-tensor        # the AdamW loop the recipe's fused kernel replaced
    python benchmarks/bench_clip_step.py --compile                 # both towers' forwards through torch.compile

The step is the clip stage's (`blip3o_mini.training.clip.ClipModule`): the open_clip model of
`configs/toy.yaml`, the stage's precision (bf16 autocast; fp32 on a CPU without bf16
instructions; `--precision` picks), the attention kernel the stage uses on this device
(`trainer.attention: auto`: the math kernel on CPU), B ShapesWorld images against B captions
plus B shape-swapped hard negatives. Each part (forward + backward) is the median over
`--repeats` runs after one warm-up. A `torch.profiler` pass over whole steps then gives the
share of the time in matrix products (mm, addmm, bmm) and their throughput, counted from the
shapes: whether the step is bound by arithmetic (fewer FLOPs per sample is the only way to a
shorter stage) or by everything around it (kernels, casts, Python). `--compile` times the same
step with both towers' forwards compiled (Inductor fuses the elementwise work, as it does for the
DiT, the LM and the UNet, whose recipes compile): whether that pays for a step bound by its
matrix products.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from matmul_profile import matmul_profile, print_matmul_profile  # benchmarks/matmul_profile.py


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the toy config's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                   help="bf16 autocast or fp32 (default: the stage's, bf16 where the CPU has bf16 instructions)")
    p.add_argument("--adamw", choices=["recipe", "per-tensor"], default="recipe",
                   help="the recipe's AdamW (fused where the parameters allow it) or the per-tensor loop")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both towers' forwards (the first run of each pays the compilation)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from blip3o_mini.clip_stage import clip_configs
    from blip3o_mini.config import load_config
    from blip3o_mini.data.dataset import generate_split
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.run import stage_attention_kernel
    from blip3o_mini.training.clip import ClipModule, swap_shape
    from blip3o_mini.training.distributed import recipe_precision_here
    from blip3o_mini.vision import ClipEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("toy")
    clip_cfg, train_cfg = clip_configs(cfg["clip"])
    B = args.batch or train_cfg.batch_size
    args.precision = args.precision or recipe_precision_here(train_cfg.precision, "cpu")
    torch.manual_seed(0)
    encoder = ClipEncoder(clip_cfg).train()
    module = ClipModule(encoder, train_cfg)
    opt = module.configure_optimizers()["optimizer"]
    if args.adamw == "per-tensor":  # the same groups and hyperparameters, updated tensor by tensor
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                                 for g in opt.param_groups], foreach=False)
    split = generate_split(0, "train", B)
    images = images_uint8(split)  # (B, 3, H, W) uint8
    captions = [c[0] for c in split["captions"]]
    ids = encoder.tokenize(captions + [swap_shape(c) for c in captions])  # (2B, T)
    model = encoder.model
    if args.compile:  # the towers' forwards, as the recipe calls them (the warm-up run compiles)
        model.encode_image, model.encode_text = torch.compile(model.encode_image), torch.compile(model.encode_text)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def vision():
        with autocast():
            emb = model.encode_image(encoder.preprocess(images), normalize=True)  # (B, E)
        emb.float().sum().backward()

    def text():
        with autocast():
            emb = model.encode_text(ids, normalize=True)  # (2B, E)
        emb.float().sum().backward()

    def step():  # the whole training step, loss and AdamW included
        with autocast():
            loss = module.training_step((images, ids), 0)
        loss.backward()
        opt.step()
        opt.zero_grad()

    module.log = lambda *a, **k: None  # no Trainer here to log to

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with stage_attention_kernel(cfg):
        parts = {"vision": median_s(vision), "text": median_s(text), "step": median_s(step)}
        profiled = matmul_profile([step] * 3)
    out = {"batch": B, "precision": args.precision, "threads": torch.get_num_threads(), "cpu": os.cpu_count(),
           "vision_fwd_bwd_s": round(parts["vision"], 4), "text_fwd_bwd_s": round(parts["text"], 4),
           "step_s": round(parts["step"], 4), **profiled}
    out["adamw"], out["compiled"] = args.adamw, args.compile
    print(f"toy CLIP step, batch {B} (+{B} hard negatives), {args.precision}, {out['threads']} thread(s), "
          f"{args.adamw} AdamW, {'compiled' if args.compile else 'eager'}")
    print(f"vision tower fwd+bwd {parts['vision'] * 1e3:7.1f} ms")
    print(f"text tower fwd+bwd   {parts['text'] * 1e3:7.1f} ms  ({2 * B} captions)")
    print(f"whole step           {parts['step'] * 1e3:7.1f} ms  (loss and AdamW included)")
    print_matmul_profile(out)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
