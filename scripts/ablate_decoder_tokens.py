"""Is the decoder where generated shapes are lost? The stage's own DiT tokens, decoded other ways.

The DiT's tokens for every GenEval-mini prompt are sampled once, with the evaluation stage's
prompts, seeds and sampling, so the variant `1:<decoder CFG>:<decoder steps>` at the config's
numbers gives the evaluation stage's own score. Each variant `T:C:N` then changes one thing:

- `T`, the temperature of the DiT's initial noise (x_0 ~ N(0, T^2)): below 1 the ODE starts
  nearer the mean and ends in denser parts of the token distribution (Glow's trick);
- `C` and `N`, the decoder's CFG scale and steps: a lower scale lets the decoder's own prior
  (crisp shapes) override imprecise tokens; a higher one paints them more literally.

`--finetune-noise S ...` also fine-tunes a copy of the run's decoder (its exported EMA weights)
for `--finetune-steps` on training tokens in the form the DiT produces them: projected onto the
generator's whitened coordinates (`whiten_dims` of them; the rest at the mean), with Gaussian
noise of std up to S there in three samples of four (cascaded diffusion's conditioning
augmentation). A decoder robust to the DiT's errors should paint its tokens better. S < 0
fine-tunes on the real tokens unchanged: the control for the extra training.

    python scripts/ablate_decoder_tokens.py --run-dir ~/.cache/blip3o-mini/runs/toy \\
        --variants 1:1.5:20 1:1:20 1:3:20 0.8:1.5:20 --finetune-noise 0.5 -1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--variants", nargs="*", default=[], help="T:C:N = noise temperature, decoder CFG, decoder steps")
    p.add_argument("--finetune-noise", type=float, nargs="*", default=[])
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    args = p.parse_args()

    from blip3o_mini.evaluation.folder import batch_seed
    from blip3o_mini.evaluation_stage import evaluation_prompts, run_evaluation_setup
    from blip3o_mini.run import stage_attention_kernel

    run = args.run_dir.expanduser()
    cfg, s, pipe, ecfg = run_evaluation_setup(run)
    prompts = evaluation_prompts(ecfg)
    starts = range(0, len(prompts), ecfg.prompts_per_batch)
    seeds = [batch_seed(ecfg.seed, i) for i in starts]
    tokens: dict[float, dict] = {}  # temperature -> {batch seed: (features, generator state)}
    results = {}
    with torch.no_grad(), stage_attention_kernel(cfg):
        for spec in args.variants:
            T, C, N = spec.split(":")
            if float(T) not in tokens:
                tokens[float(T)] = dit_tokens(pipe, prompts, starts, seeds, ecfg.prompts_per_batch, s, float(T))
            results[spec] = score(pipe.decoder, prompts, tokens[float(T)], ecfg, float(C), int(N), spec)
    for noise in args.finetune_noise:
        with stage_attention_kernel(cfg):
            decoder = finetune(pipe, run, noise, args.finetune_steps, args.finetune_lr)
        if 1.0 not in tokens:
            with torch.no_grad(), stage_attention_kernel(cfg):
                tokens[1.0] = dit_tokens(pipe, prompts, starts, seeds, ecfg.prompts_per_batch, s, 1.0)
        name = f"decoder fine-tuned, token noise {noise}"
        with torch.no_grad(), stage_attention_kernel(cfg):
            results[name] = score(decoder, prompts, tokens[1.0], ecfg, s.decoder_guidance_scale, s.decoder_steps, name)
    print(json.dumps({k: round(v["overall"], 4) for k, v in results.items()}))


def dit_tokens(pipe, prompts, starts, seeds, per_batch: int, s, temperature: float) -> dict:
    """The DiT's CLIP tokens (b, 64, F) per evaluation batch, drawn as the pipeline draws them
    (one generator per batch, seeded as the evaluation stage seeds it), the initial noise scaled
    by `temperature`; with the generator's state after the DiT, so the decoder's noise follows."""
    gen, out = pipe.generator, {}
    for i, seed in zip(starts, seeds):
        g = torch.Generator().manual_seed(seed)
        batch = [m["prompt"] for m in prompts[i:i + per_batch]]
        cond = gen.condition(pipe.backbone, batch)  # (b, Nq, K)
        x_0 = torch.randn((len(batch), gen.cfg.num_tokens, gen.dit_cfg.in_dim), generator=g) * temperature
        r = gen.flow.sample(gen.dit, cond, x_0.shape[1:], x_0=x_0, num_steps=s.num_inference_steps,
                            guidance_scale=s.guidance_scale, generator=g, sde_noise=s.sde_noise,
                            guidance_interval=s.guidance_interval)
        out[seed] = (gen.denormalize(r.x_1), g.get_state())  # (b, 64, F)
    return out


def score(decoder, prompts, tokens: dict, ecfg, guidance: float, steps: int, name: str) -> dict:
    """Decode every batch's tokens and score the images with the GenEval-mini detector."""
    from blip3o_mini.evaluation import score_folder, write_geneval_folder

    def generate(batch, seed):
        feats, state = tokens[seed]
        g = torch.Generator()
        g.set_state(state)
        return decoder.decode(feats, steps, guidance, generator=g, output_type="pil")

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_geneval_folder(Path(tmp) / "geneval", prompts, generate, ecfg.samples_per_prompt,
                                      ecfg.prompts_per_batch, ecfg.seed, overwrite=True)
        result = score_folder(folder, write=False)
    summary = result.summary()
    blank = {k: round(v["blank"], 2) for k, v in result.object_counts().items()}
    print(f"{name}: " + json.dumps({k: round(v, 3) for k, v in summary.items() if isinstance(v, float)})
          + f"  blank: {blank}", flush=True)
    return summary


def finetune(pipe, run: Path, noise: float, steps: int, lr: float):
    """A copy of the run's decoder trained `steps` more on noisy, projected training tokens
    (noise < 0: the real tokens); returns its EMA, as the decoder stage exports."""
    import datasets

    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.features import load_split_features
    from blip3o_mini.training.decoder import decoder_loss
    from blip3o_mini.training.ema import update_ema

    gen = pipe.generator
    images = images_uint8(datasets.load_from_disk(str(run / "data" / "shapesworld"))["train"])  # (M, 3, H, W)
    feats = load_split_features(run / "clip", "train").float()  # (M, 64, F)
    decoder = copy.deepcopy(pipe.decoder).train().requires_grad_(True)
    ema = copy.deepcopy(decoder).requires_grad_(False)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:  # cosine from lr to lr / 10
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(images), (32,), generator=g)
        f = feats[idx]  # (32, 64, F)
        if noise >= 0:
            with torch.no_grad():
                z = gen.normalize(f)  # (32, 64, L) the DiT's whitened coordinates
                sigma = torch.rand(len(z), 1, 1, generator=g) * noise  # (32, 1, 1)
                sigma = sigma * (torch.rand(len(z), 1, 1, generator=g) < 0.75)  # a quarter stay clean
                f = gen.denormalize(z + sigma * torch.randn(z.shape, generator=g))  # (32, 64, F)
        loss = decoder_loss(decoder, images[idx], f, cond_drop_prob=0.1, generator=g).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        update_ema(ema, decoder, 0.995, step)
        if step % 100 == 0:
            print(f"  fine-tune (noise {noise}) step {step}/{steps}  loss {loss.item():.4f}", flush=True)
    return ema.eval()


if __name__ == "__main__":
    main()
