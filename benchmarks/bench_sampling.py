"""Time text-to-image sampling of the toy pipeline per image, at batch 1 and batch 16.

    python benchmarks/bench_sampling.py                     # toy config, random weights, CPU
    python benchmarks/bench_sampling.py --threads 1 --json sampling.json
    python benchmarks/bench_sampling.py --device cuda --batch 1 16 64
    python benchmarks/bench_sampling.py --run-dir runs/toy  # a finished run's trained weights

What is timed, in the order `Blip3oMiniPipeline.__call__` runs it (paper section 3):

    condition  prompt -> chat template + [IMG] + 64 queries -> frozen backbone -> Q (B, Nq, K)
    dit        Euler sampling of the NextDiT at the config's `generation.flow.num_steps`, with
               CFG at `guidance_scale` (the conditional and null rows run as one batch of 2B)
    decoder    the pixel decoder's own sampling at `decoder.eval.num_inference_steps` (CFG
               `guidance_scale`), features (B, 64, F) -> PIL images
    total      `pipe(prompts)` end to end, measured on its own (not the sum of the parts)

Latency does not depend on trained weights, so without `--run-dir` the pipeline is built from
the config with random weights (`Blip3oMiniPipeline.from_config`): the same modules at the same
sizes. Each figure is the median over `--repeats` runs after `--warmup` runs, divided by the
batch size; CPU ms (process time, all threads) is printed beside wall time because on a shared
machine wall time also measures the other jobs. Prompts are GenEval-mini prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

STAGES = ("condition", "dit", "decoder", "total")
PIPELINE_STAGES = ("clip", "understanding", "generation", "decoder")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_pipeline(config: str, run_dir: str | None, device: str):
    """(pipeline, where its weights come from): a finished run's, or random ones of `config`."""
    from blip3o_mini.config import load_config
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig

    cfg = load_config(config)
    sampling = SamplingConfig.from_config(cfg)
    if run_dir is None:
        return Blip3oMiniPipeline.from_config(cfg, sampling).to(device), f"random weights, {config} config"
    missing = [s for s in PIPELINE_STAGES if not (Path(run_dir) / s / "stage.json").exists()]
    if missing:
        raise SystemExit(f"bench_sampling: --run-dir {run_dir} lacks finished stage(s) {missing}; "
                         "finish them with `blip3o-mini run`, or leave --run-dir out to time random weights")
    return Blip3oMiniPipeline.from_run(run_dir, sampling).to(device), f"weights of the run in {run_dir}"


def measure(pipe, prompts: list[str], repeats: int, warmup: int, cuda: bool) -> dict:
    """{stage: {"wall": [s, ...], "cpu": [s, ...]}} for one batch of `prompts`."""
    import torch

    s, gen = pipe.sampling, pipe.generator

    def clock(fn):
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, time.process_time() - cpu_start

    def one_round() -> dict:
        with torch.no_grad():
            cond, *t_cond = clock(lambda: gen.condition(pipe.backbone, prompts))  # (B, Nq, K)
            shape = (gen.cfg.num_tokens, gen.dit_cfg.in_dim)  # (N, L): the DiT's space (whitened: L < F)
            feats, *t_dit = clock(lambda: gen.denormalize(gen.flow.sample(
                gen.dit, cond, shape, num_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale).x_1))  # (B, N, L) -> (B, N, F)
            images, *t_dec = clock(lambda: pipe.decoder.decode(
                feats, s.decoder_steps, s.decoder_guidance_scale, output_type="pil"))
            out, *t_total = clock(lambda: pipe(prompts))
        assert len(images) == len(out.images) == len(prompts) and out.features.shape == feats.shape
        return dict(zip(STAGES, (t_cond, t_dit, t_dec, t_total)))

    for _ in range(warmup):
        one_round()
    times = {stage: {"wall": [], "cpu": []} for stage in STAGES}
    for _ in range(repeats):
        for stage, (wall, cpu) in one_round().items():
            times[stage]["wall"].append(wall)
            times[stage]["cpu"].append(cpu)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="toy", help="config name or YAML path (sizes and sampling steps)")
    p.add_argument("--run-dir", default=None, help="a finished run to load instead of random weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("bench_sampling: --batch and --repeats must be >= 1, --warmup >= 0")

    import torch

    from blip3o_mini.evaluation import make_prompts

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_sampling: --device cuda asked for but no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe, source = build_pipeline(args.config, args.run_dir, args.device)
    all_prompts = [m["prompt"] for m in make_prompts()]  # 6 tags x 54, tags in order
    results = {}
    for batch in args.batch:
        stride = max(1, len(all_prompts) // batch)
        prompts = [all_prompts[(i * stride) % len(all_prompts)] for i in range(batch)]  # every tag
        times = measure(pipe, prompts, args.repeats, args.warmup, cuda)
        results[batch] = {stage: {"ms_per_image": 1000 * statistics.median(t["wall"]) / batch,
                                  "cpu_ms_per_image": 1000 * statistics.median(t["cpu"]) / batch,
                                  "ms_per_batch": 1000 * statistics.median(t["wall"]),
                                  "wall_s": [round(x, 4) for x in t["wall"]]}
                          for stage, t in times.items()}

    s = pipe.sampling
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    device = torch.cuda.get_device_name() if cuda else cpu_name()
    backbone_lm = sum(p.numel() for n, p in pipe.backbone.named_parameters() if not n.startswith("encoder."))
    params = {"backbone": backbone_lm, "queries+dit": sum(p.numel() for p in pipe.generator.parameters()),
              "decoder": sum(p.numel() for p in pipe.decoder.parameters())}
    print(f"device: {device}; {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s); "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end; torch {torch.__version__}")
    print(f"pipeline: {source}; parameters (M): "
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in params.items()))
    print(f"sampling: DiT {s.num_inference_steps} Euler steps, CFG {s.guidance_scale}; decoder "
          f"{s.decoder_steps} steps, CFG {s.decoder_guidance_scale}; fp32; median of {args.repeats} "
          f"after {args.warmup} warm-up")
    head = "".join(f" {f'b{b} ms/img':>11} {f'b{b} CPU ms':>11}" for b in args.batch)
    print(f"{'stage':<10}" + head)
    for stage in STAGES:
        print(f"{stage:<10}" + "".join(f" {results[b][stage]['ms_per_image']:>11.1f} "
                                       f"{results[b][stage]['cpu_ms_per_image']:>11.1f}" for b in args.batch))
    print("images/s (total): " + ", ".join(
        f"batch {b} {1000 / results[b]['total']['ms_per_image']:.1f}" for b in args.batch))
    if args.json:
        report = {"device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "load_average": load, "torch": torch.__version__, "pipeline": source,
                  "config": args.config, "parameters": params, "sampling": asdict(s) | {"dtype": "fp32"},
                  "repeats": args.repeats, "warmup": args.warmup,
                  "batches": {str(b): r for b, r in results.items()}}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
