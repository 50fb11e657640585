"""Time one stage-2 training step at BLIP3-o-4B size on one GPU in bf16: samples/s, peak memory
and model-FLOPs utilisation (MFU).

    python benchmarks/bench_full_step.py                          # full size: needs a CUDA GPU
    python benchmarks/bench_full_step.py --batch 16 --steps 10 --json result.json
    python benchmarks/bench_full_step.py --size tiny              # smoke test, runs on a CPU

What one step is (the `GenerationModule.training_step` math, without Lightning around it): a
batch of prompts through the frozen backbone with the 64 learnable queries appended, the
NextDiT's flow-matching loss on cached CLIP target features, backward (through the backbone's
activations to the queries; the backbone's weights get no gradient), gradient clipping 1.0 and
an AdamW step, under bf16 autocast with fp32 master weights, as `precision: bf16-mixed`.

Full size, random weights, nothing downloaded: a Qwen2.5-VL-3B built on the GPU from the
checkpoint's config (`describe.QWEN2_5_VL`, 3.75B parameters, bf16), the 1792 x 24-layer
NextDiT of `configs/full-4b.yaml` (gradient checkpointing on), and random (B, 64, 1792) target
features standing in for extracted EVA-CLIP features (`data.targets: features`). Prompts are
ShapesWorld captions strung together to about `--prompt-tokens` tokens.

MFU = samples/s x model FLOPs per sample (`sizing.train_flops_per_sample`, the formula the
notebook and the README use) / the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; pass
`--peak-tflops` for other GPUs).

Reference for scale: the official BLIP3-o-4B run took ~10 days on 32 H200s for ~150k steps at
a global batch of 512, i.e. ~150e3 x 512 / (10 x 86400 x 32) = ~2.8 samples/s per GPU, with the
EVA-CLIP encoder running inside every step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def prompts_of_length(tokenizer, num_prompts: int, target_tokens: int, seed: int = 0) -> list[str]:
    """ShapesWorld captions joined until each chat-formatted prompt has ~target_tokens tokens."""
    import random

    from blip3o_mini.data import generate_split

    captions = [c for row in generate_split(seed, "train", 64)["captions"] for c in row]
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        text = rng.choice(captions)
        while len(tokenizer(text)["input_ids"]) < target_tokens - 20:  # ~20 tokens of chat template
            text += ". " + rng.choice(captions)
        out.append(text)
    return out


def build(size: str, device: str):
    """(backbone, generator, ModelDescription) on `device`, random weights."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from blip3o_mini.clip_models import TINY_EVA_MODEL
    from blip3o_mini.config import load_config
    from blip3o_mini.data import generate_split
    from blip3o_mini.describe import (QWEN2_5_VL, Components, build_clip_tower, describe_components,
                                      generation_configs)
    from blip3o_mini.generation import Blip3oGenerator
    from blip3o_mini.qwen_vl import QwenVLBackbone, tiny_qwen_vl
    from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts

    cfg = load_config("full-4b")
    tokenizer = build_tokenizer(shapesworld_texts(generate_split(0, "train", 300)), "qwen2_5_vl")
    if size == "full":
        qcfg = Qwen2_5_VLConfig(**QWEN2_5_VL["Qwen/Qwen2.5-VL-3B-Instruct"])
        with torch.device(device):  # initialised on the GPU, in bf16: seconds, not minutes
            model = Qwen2_5_VLForConditionalGeneration._from_config(qcfg, dtype=torch.bfloat16,
                                                                    attn_implementation="sdpa")
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                        tokenizer=tokenizer, chat_template=tokenizer.chat_template)
        backbone = QwenVLBackbone(model, processor)
    else:  # the same classes at a few hundred KB
        cfg["generation"]["dit"] |= {"dim": 64, "depth": 2, "num_heads": 2, "multiple_of": 16}
        cfg["clip"] |= {"model_name": TINY_EVA_MODEL, "image_size": 224}
        backbone = tiny_qwen_vl(tokenizer)
    backbone = backbone.to(device).freeze()
    clip, feature_dim = build_clip_tower(cfg, "meta")  # only counted (FLOPs of targets: images)
    gen_cfg, train_cfg, _ = generation_configs(cfg)
    torch.manual_seed(0)
    generator = Blip3oGenerator(gen_cfg, feature_dim, backbone.hidden_size).to(device)
    lm = backbone.model.model.language_model
    desc = describe_components(Components(backbone.model, lm.layers, generator, clip, torch.nn.Module(),
                                          {k: "" for k in ("backbone", "queries", "dit", "clip", "decoder")}
                                          | {"targets": "features"}), f"bench-{size}")
    return backbone, generator, desc, train_cfg


def run(args) -> dict:
    import torch

    from blip3o_mini.sizing import train_flops_per_sample

    cuda = torch.cuda.is_available()
    if args.size == "full" and not cuda:
        sys.exit("bench_full_step.py --size full needs a CUDA GPU: it builds a 3.75B-parameter Qwen2.5-VL-3B "
                 "and a 1.36B-parameter DiT in bf16 (tens of GB). On a CPU run `--size tiny` for a smoke test.")
    device = "cuda" if cuda else "cpu"
    backbone, generator, desc, train_cfg = build(args.size, device)
    prompts = prompts_of_length(backbone.tokenizer, args.batch, args.prompt_tokens)
    seq_len = round(sum(len(backbone.tokenizer(backbone.format_prompt(p, False) + "[IMG]")["input_ids"])
                        for p in prompts) / len(prompts)) + generator.cfg.num_query_tokens
    features = torch.randn(args.batch, generator.cfg.num_tokens, generator.feature_dim, device=device)
    params = [p for p in generator.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=0.0, fused=cuda)
    generator.train()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = generator.loss(backbone, prompts, features).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    flops = train_flops_per_sample(desc, seq_len)["total"]
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    sps = args.batch / seconds
    return {"size": args.size, "device": name, "batch": args.batch, "seq_len": seq_len,
            "step_seconds": round(seconds, 4), "samples_per_s": round(sps, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "model_tflops_per_sample": round(flops / 1e12, 4), "achieved_tflops": round(sps * flops / 1e12, 2),
            "mfu": round(sps * flops / (peak * 1e12), 4) if peak else None,
            "params": {c.name: c.total for c in desc.components if c.name in ("backbone", "queries", "dit")},
            "final_loss": round(float(loss.detach()), 4), "torch": torch.__version__,
            "reference_official_4b_samples_per_s_per_gpu": round(150e3 * 512 / (10 * 86400 * 32), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--batch", type=int, default=16, help="samples per step (BLIP3-o: 16 per GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
