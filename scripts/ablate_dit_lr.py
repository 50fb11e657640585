"""How fast does the toy NextDiT learn at each learning rate? An ablation behind the toy config's
`generation.train.lr` (docs/status.md).

    python scripts/ablate_dit_lr.py --run-dir ~/.cache/blip3o-mini/runs/toy
    python scripts/ablate_dit_lr.py --run-dir runs/toy --lrs 5e-4 4e-3 --steps 1000 --noise-repeats 1 2

The condition Q of every training image's canonical caption is computed once with a finished
run's queries and frozen backbone, then fresh DiTs of the run's size are trained on
(Q, CLIP features) pairs with `FlowMatching.loss`, AdamW, 100 warmup steps then a constant lr,
gradient clipping 1.0. Freezing Q isolates the DiT: each step costs a DiT step only, not the
pass through the LLM, so the sweep runs in minutes. Every `--eval-every` steps it prints the
validation flow loss on (up to) 256 held-out images with their own Q and with the null Q (zeros) at
fixed (noise, t); the gap between the two is how much the DiT reads its prompt.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3, 4e-3])
    p.add_argument("--noise-repeats", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"],
                   help="training step precision(s) to compare (bf16-mixed: CPU bf16 autocast)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from blip3o_mini.run import run_config, stage_attention_kernel

    with stage_attention_kernel(run_config(args.run_dir.expanduser())):  # math SDPA on CPU, as the stages
        sweep(args)


def sweep(args: argparse.Namespace) -> None:
    import datasets

    from blip3o_mini.dit import NextDiT
    from blip3o_mini.features import load_split_features
    from blip3o_mini.flow import FlowMatching, interpolate, velocity_target
    from blip3o_mini.generation_stage import load_generator
    from blip3o_mini.understanding_stage import load_stage_backbone

    run = args.run_dir.expanduser()
    gen = load_generator(run / "generation")
    backbone = load_stage_backbone(run / "understanding").freeze()
    ds = datasets.load_from_disk(str(run / "data" / "shapesworld"))

    def condition(captions: list[str]) -> torch.Tensor:  # (n, Nq, K), 500 prompts at a time
        with torch.no_grad():
            return gen.condition(backbone, captions, chunk_size=500)

    t0 = time.perf_counter()
    q_train = condition([c[0] for c in ds["train"]["captions"]])  # (N, Nq, K)
    n_val = min(256, len(ds["val"]))
    q_val = condition([c[0] for c in ds["val"].select(range(n_val))["captions"]])  # (V, Nq, K)
    x_train = gen.normalize(load_split_features(run / "clip", "train"))  # (N, 64, F)
    x_val = gen.normalize(load_split_features(run / "clip", "val")[:n_val])  # (V, 64, F)
    print(f"Q of {len(q_train)} train and {n_val} val captions cached in {time.perf_counter() - t0:.0f} s")

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(x_val.shape, generator=g)  # fixed noise and times: comparable evaluations
    t = torch.rand(len(x_val), generator=g)
    x_t, v = interpolate(x0, x_val, t), velocity_target(x0, x_val)

    def val_losses(dit: NextDiT) -> tuple[float, float]:
        dit.eval()
        with torch.no_grad():
            own, null = (torch.nn.functional.mse_loss(dit(x_t, t, c, None), v).item()
                         for c in (q_val, torch.zeros_like(q_val)))
        dit.train()
        return own, null

    print(f"{'precision':>10} {'lr':>8} {'repeats':>7} {'step':>6} {'val own Q':>9} {'null Q':>7} {'gap':>6} {'s':>6}")
    for precision, repeats, lr in itertools.product(args.precision, args.noise_repeats, args.lrs):
        torch.manual_seed(0)
        dit = NextDiT(gen.dit_cfg)
        flow = FlowMatching(**{**gen.cfg.flow, "noise_repeats": repeats})
        opt = torch.optim.AdamW(dit.parameters(), lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            i = torch.randint(0, len(q_train), (args.batch_size,))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = flow.loss(dit, x_train[i], q_train[i]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % args.eval_every == 0 or step == args.steps:
                own, null = val_losses(dit)
                print(f"{precision:>10} {lr:>8.0e} {repeats:>7} {step:>6} {own:>9.4f} {null:>7.4f} {1 - own / null:>6.1%} "
                      f"{time.perf_counter() - start:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
