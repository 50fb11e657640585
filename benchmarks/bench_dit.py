"""Time one DiT training step (forward + backward + AdamW) of our NextDiT against diffusers'
`LuminaNextDiT2DModel` at the same width, depth, heads and tokens (8x8 grid, patch 1 unless
`--patch-size` says otherwise).

    python benchmarks/bench_dit.py                                   # toy size, CPU, fp32
    python benchmarks/bench_dit.py --device cuda --size full --dtype bf16 --batch 32
    python benchmarks/bench_dit.py --size toy-config --dtype bf16 --batch 64 --attention auto --compile
                                                                      # the toy stage's DiT step, eager and compiled
    python benchmarks/bench_dit.py --size toy-config --dtype bf16 --batch 64 --attention auto --compile --patch-size 2

Both models train with the same flow-matching loss (`blip3o_mini.flow.FlowMatching`) on the
same random tensors in one process; steps alternate between the two models in rounds so that
a shared machine's load changes hit both alike. bf16 means autocast mixed precision (fp32
master weights and AdamW states), as BLIP3-o's bf16 training.

How diffusers' model is fed: it takes latent images, so x_t (B, 64, F) is reshaped to
(B, F, 8, 8) with `in_channels = F`, `patch_size = 1`, `learn_sigma = False`; the condition
goes in as `encoder_hidden_states` (B, Nq, K) with an all-ones `encoder_mask`; the rotary
table comes from `get_2d_rotary_pos_embed_lumina(head_dim, 8, 8)`. Differences that remain
(reported with the parameter counts): diffusers projects the K-wide condition inside every
block's cross-attention (K -> D per layer), where we (like BLIP3-o's copy) project it once with
a caption projection; diffusers also gets no gradient-checkpointing flag here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time


def build_models(size: str, device: str, patch_size: int | None = None, dim: int | None = None):
    import dataclasses

    import torch
    from diffusers import LuminaNextDiT2DModel

    from blip3o_mini.dit import FULL_DIT, DiTConfig, NextDiT

    if size == "toy-config":  # the DiT configs/toy.yaml trains, conditioned on the toy LM's states
        from blip3o_mini.config import load_config
        from blip3o_mini.describe import build_components

        cfg = build_components(load_config("toy")).generator.dit_cfg
    else:
        cfg = DiTConfig(**FULL_DIT) if size == "full" else DiTConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("patch_size", patch_size), ("dim", dim)) if v is not None})
    ours = NextDiT(cfg)
    theirs = LuminaNextDiT2DModel(
        sample_size=cfg.grid, patch_size=cfg.patch_size, in_channels=cfg.in_dim, hidden_size=cfg.dim,
        num_layers=cfg.depth, num_attention_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=None, learn_sigma=False, qk_norm=True,
        cross_attention_dim=cfg.cond_dim)
    torch.nn.init.zeros_(theirs.pad_token)  # left uninitialised (torch.empty) by diffusers
    return cfg, ours.to(device), theirs.to(device)


def lumina_velocity(model, cfg):
    """Wrap diffusers' model as a flow-matching velocity model on (B, 64, F) tokens."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    from einops import rearrange

    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, cfg.grid, cfg.grid)  # (8, 8, Dh/2) complex

    def v(x_t, t, cond, cond_mask):
        B = x_t.shape[0]
        mask = cond_mask if cond_mask is not None else cond.new_ones(B, cond.shape[1])  # (B, Nq)
        img = rearrange(x_t, "b (h w) f -> b f h w", h=cfg.grid)  # (B, F, 8, 8)
        out = model(img, t, cond, mask, rope, cross_attention_kwargs={}).sample  # (B, F, 8, 8)
        return rearrange(out, "b f h w -> b (h w) f")  # (B, 64, F)

    return v


def time_steps(runners: dict, args, cuda: bool) -> tuple[dict, dict, dict]:
    """Warm every runner up, then time `args.rounds` x `args.steps` steps of each, interleaved:
    wall and process CPU seconds per step, and peak GiB per runner on CUDA."""
    import torch

    for name, (_, step) in runners.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        if name == "ours, compiled":
            print(f"compilation and {args.warmup} warm-up step(s): {time.perf_counter() - start:.0f} s")
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}  # process CPU time: less sensitive to other load
    peak = {}
    for _ in range(args.rounds):
        for name, (_, step) in runners.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
            if cuda:
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)
    return times, cpu_times, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", choices=["toy", "toy-config", "full"], default="toy",
                   help="toy: DiTConfig's defaults; toy-config: configs/toy.yaml's DiT; full: BLIP3-o's")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cond-len", type=int, default=64, help="Nq condition tokens (BLIP3-o: 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of steps per model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--patch-size", type=int, default=None, help="override the DiT's patch size (both models)")
    p.add_argument("--dim", type=int, default=None, help="override the DiT's width (both models)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in our DiT")
    p.add_argument("--attention", choices=["default", "auto", "math"], default="default",
                   help="attention kernel (`trainer.attention`); the stages use auto, the math kernel on CPU")
    p.add_argument("--compile", action="store_true",
                   help="also time our DiT under torch.compile (as `generation.train.compile`), after its compilation")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from blip3o_mini.dit import NextDiT
    from blip3o_mini.flow import FlowMatching
    from blip3o_mini.training.attention_kernel import attention_kernel

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_dit: --device cuda asked for but no CUDA device is visible")
    if args.size == "full" and args.device == "cpu":
        raise SystemExit("bench_dit: --size full (1.4B parameters) needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, ours, theirs = build_models(args.size, args.device, args.patch_size, args.dim)
    ours.cfg.gradient_checkpointing = args.grad_ckpt
    fm = FlowMatching()
    x_1 = torch.randn(args.batch, cfg.grid ** 2, cfg.in_dim, device=args.device)
    cond = torch.randn(args.batch, args.cond_len, cfg.cond_dim, device=args.device)
    cuda = args.device.startswith("cuda")

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    runners = {}
    models = [("ours (NextDiT)", ours, ours), ("diffusers Lumina", theirs, lumina_velocity(theirs, cfg))]
    if args.compile:  # a second copy of our DiT, so the eager one stays eager
        compiled = NextDiT(cfg).to(args.device)
        compiled.load_state_dict(ours.state_dict())
        models.append(("ours, compiled", compiled, torch.compile(compiled.forward, dynamic=False)))
    for name, model, v in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step(v=v, opt=opt):
            with autocast():
                loss = fm.loss(v, x_1, cond).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            return loss.item()

        runners[name] = (model, step)

    with attention_kernel(args.attention, "cuda" if cuda else "cpu"):  # every step, warm-up and
        times, cpu_times, peak = time_steps(runners, args, cuda)  # compilation included, as in a stage
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {device}; load average {load:.1f}; torch {torch.__version__}")
    print(f"size {args.size}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}, tokens "
          f"{cfg.grid ** 2} x {cfg.in_dim} (patch {cfg.patch_size}), condition {args.cond_len} x {cfg.cond_dim}; batch "
          f"{args.batch}, {args.dtype}{', grad ckpt (ours)' if args.grad_ckpt else ''}, attention {args.attention}")
    print(f"median of {args.rounds * args.steps} steps after {args.warmup} warm-up")
    extra = f" {'peak GiB':>9}" if cuda else f" {'CPU ms/step':>12}"
    print(f"{'model':<18} {'params (M)':>10} {'ms/step':>9} {'samples/s':>10}" + extra)
    ms, cpu_ms = {}, {}
    for name, (model, _) in runners.items():
        ms[name] = 1000 * statistics.median(times[name])
        cpu_ms[name] = 1000 * statistics.median(cpu_times[name])
        params = sum(p.numel() for p in model.parameters()) / 1e6
        row = f"{name:<18} {params:>10.1f} {ms[name]:>9.1f} {1000 * args.batch / ms[name]:>10.1f}"
        print(row + (f" {peak[name]:>9.2f}" if cuda else f" {cpu_ms[name]:>12.1f}"))
    a, b, *c = runners  # ours, diffusers[, ours compiled]
    print(f"ratio ours / diffusers, wall time per step: {ms[a] / ms[b]:.2f}"
          + ("" if cuda else f"; CPU time per step: {cpu_ms[a] / cpu_ms[b]:.2f}"))
    if c:
        print(f"ratio ours compiled / ours eager, wall time per step: {ms[c[0]] / ms[a]:.2f}")


if __name__ == "__main__":
    main()
