"""Time one optimizer step on the toy stage's DiT (configs/toy.yaml): AdamW on every weight,
against Muon on the blocks' matrices with AdamW on the rest (`generation.train.optimizer:
muon`, blip3o_mini/training/muon.py), and Newton-Schulz on those matrices one at a time
against one batched call per shape (what MuonAdamW does), in bf16 and in fp32 (MuonAdamW's
choice depends on the device: `muon.ns_dtype`, fp32 on CPUs without bf16 instructions).

    python benchmarks/bench_optimizer_step.py
    python benchmarks/bench_optimizer_step.py --device cuda --steps 50

Gradients are random tensors: an optimizer step's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main(argv: list[str] | None = None) -> dict:
    import torch

    from blip3o_mini.config import load_config
    from blip3o_mini.describe import build_components
    from blip3o_mini.dit import NextDiT
    from blip3o_mini.training.muon import MuonAdamW, hidden_matrices, newton_schulz, ns_dtype, with_muon_group

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dit = NextDiT(build_components(load_config("toy")).generator.dit_cfg).to(args.device)
    for w in dit.parameters():
        w.grad = torch.randn_like(w)
    matrices = hidden_matrices(dit.blocks)
    shapes: dict[tuple, list] = {}
    for m in matrices:
        shapes.setdefault(tuple(m.shape), []).append(m.grad)
    cuda = args.device.startswith("cuda")

    def timed(fn) -> float:
        """Median wall ms of `fn` over --steps calls after --warmup."""
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times[args.warmup:])

    adamw = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    muon = MuonAdamW(with_muon_group([{"params": list(dit.parameters())}], matrices), lr=1e-4)
    rows = {
        "AdamW, every weight": timed(adamw.step),
        "Muon + AdamW (MuonAdamW)": timed(muon.step),
        "Newton-Schulz, one by one": timed(lambda: [newton_schulz(g) for gs in shapes.values() for g in gs]),
    }
    for dtype in (torch.bfloat16, torch.float32):
        rows[f"Newton-Schulz, batched, {str(dtype)[6:]}"] = timed(
            lambda: [newton_schulz(torch.stack(gs), dtype=dtype) for gs in shapes.values()])
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {device}; torch {torch.__version__}")
    params = sum(w.numel() for w in dit.parameters()) / 1e6
    print(f"toy DiT: {params:.2f} M parameters; Muon's share: {len(matrices)} matrices in "
          f"{len(shapes)} shapes ({sum(m.numel() for m in matrices) / 1e6:.2f} M)")
    print(f"MuonAdamW's Newton-Schulz here: {str(ns_dtype(torch.device(args.device)))[6:]}")
    for name, ms in rows.items():
        print(f"{name:<34} {ms:>8.1f} ms")
    return rows


if __name__ == "__main__":
    main()
