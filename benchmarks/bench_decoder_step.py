"""What a toy pixel-decoder training step costs, eager and with the UNet compiled.

    python benchmarks/bench_decoder_step.py               # toy config, CPU, as the stage runs
    python benchmarks/bench_decoder_step.py --compile     # also the step with the UNet compiled (decoder.train.compile)
    python benchmarks/bench_decoder_step.py --compile --precision bf16-mixed

The step is the decoder stage's (`blip3o_mini.training.decoder.DecoderModule`): the config's
diffusers UNet (random weights: the cost does not depend on them), a batch of random 64x64
images and random CLIP tokens of the toy's shape, the recipe's precision unless `--precision`
says otherwise, AdamW, and the EMA update. Times are medians over `--steps` steps after
`--warmup` steps (which, compiled, pay the compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from compile_timing import summarize  # benchmarks/compile_timing.py


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="toy")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default=None, help="32-true or bf16-mixed (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--compile", action="store_true",
                   help="also time the step with the UNet compiled (decoder.train.compile)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from blip3o_mini.config import load_config
    from blip3o_mini.decoder_stage import decoder_configs
    from blip3o_mini.training.decoder import DecoderModule
    from blip3o_mini.training.distributed import recipe_precision_here

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model_cfg, train_cfg, _ = decoder_configs(cfg.get("decoder", {}), (1, 64, 128))
    precision = recipe_precision_here(args.precision or train_cfg.precision, "cpu")
    B, side = train_cfg.batch_size, model_cfg.image_size
    torch.manual_seed(0)
    batch = (torch.randint(0, 256, (B, 3, side, side), dtype=torch.uint8),  # (B, 3, H, W)
             torch.randn(B, model_cfg.num_tokens, model_cfg.feature_dim))  # (B, N, D)

    def timed(module: DecoderModule, label: str) -> list[float]:
        module.log = lambda *a, **k: None  # no Trainer here to log to
        opt = module.configure_optimizers()["optimizer"]

        def step(i: int) -> None:  # the recipe's training_step: with `compile` it compiles the UNet first
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = module.training_step(batch, i)
            loss.backward()
            opt.step()
            opt.zero_grad()
            module.on_train_batch_end(None, batch, i)  # the EMA

        start = time.perf_counter()
        for i in range(args.warmup):
            step(i)
        print(f"{label}: {args.warmup} warm-up steps {time.perf_counter() - start:.0f} s", flush=True)
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        return times

    results = {}
    eager = dataclasses.replace(train_cfg, compile=False)
    torch.manual_seed(0)
    results["eager"] = timed(DecoderModule(model_cfg, eager), "eager")
    if args.compile:
        torch.manual_seed(0)
        results["compiled"] = timed(DecoderModule(model_cfg, dataclasses.replace(eager, compile=True)), "compiled")
    out = {"config": args.config, "batch": B, "precision": precision, "threads": torch.get_num_threads()}
    print(f"decoder step ({args.config}), batch {B}, {side}x{side} images, {precision}, {out['threads']} thread(s)")
    return summarize(results, out)


if __name__ == "__main__":
    main()
