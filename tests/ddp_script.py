"""Stage 2 on CPU with N processes (DDP, gloo), for tests/test_scaling.py and notebook 07.

    python tests/ddp_script.py OUT_DIR [--devices 2] [--steps 6] [--resume-at 3]

Trains a tiny generator through a tiny frozen backbone with `generation_run` (the code path of
every config), `devices` processes, a global batch of 4, for `steps` steps (the 16 samples make
4 steps per epoch, so an epoch boundary is crossed), saving a checkpoint at step `resume-at`.
Then it trains again from that checkpoint to `steps`. Rank 0 writes OUT_DIR/result.json (the
losses averaged over ranks, per step) and the generator weights of both runs.

For runs with different process counts to be comparable, every random draw depends on the
*sample*, not on the process: the flow-matching noise x_0 and time t of a sample are drawn
from a generator seeded with (epoch, sample index), and no condition is dropped
(cond_drop_prob 0). GenerationModule draws from the global RNG, which differs per rank, so
this script's subclass `SampleSeededModule` passes x_0 and t to `FlowMatching.loss` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/: also when notebook 07 loads this file by path
from tiny_backbone import TinyBackbone  # noqa: E402

NUM_SAMPLES, F, K, GLOBAL_BATCH = 16, 8, 16, 4


class IndexedDataset(torch.utils.data.Dataset):
    """(prompt, features (64, F), sample index)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.features = torch.randn(NUM_SAMPLES, 64, F, generator=g)
        colors, shapes = ["red", "blue", "green", "purple"], ["circle", "square", "triangle", "star"]
        self.prompts = [f"a {colors[i % 4]} {shapes[i // 4]}" for i in range(NUM_SAMPLES)]

    def __len__(self):
        return NUM_SAMPLES

    def __getitem__(self, i):
        return self.prompts[i], self.features[i], i


def collate_indexed(batch):
    prompts, feats, index = zip(*batch)
    return list(prompts), torch.stack(feats), torch.tensor(index)


def sample_noise(index: torch.Tensor, epoch: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 (B, *shape) and t (B,) drawn per sample from seed (epoch, index)."""
    x_0, t = [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(1000 * epoch + i)
        x_0.append(torch.randn(shape, generator=g))
        t.append(torch.rand((), generator=g))
    return torch.stack(x_0), torch.stack(t)


def config(devices: int, steps: int) -> dict:
    return {
        "generation": {"num_query_tokens": 4, "feature_norm": "none",
                       "dit": {"dim": 32, "depth": 2, "num_heads": 2, "multiple_of": 16},
                       "flow": {"cond_drop_prob": 0.0},
                       "train": {"batch_size": GLOBAL_BATCH // devices, "max_steps": steps, "lr": 3e-3,
                                 "min_lr": 1e-3, "warmup_steps": 2, "log_every": 1, "seed": 0}},
        "trainer": {"accelerator": "cpu", "devices": devices,
                    "strategy": "ddp" if devices > 1 else "auto", "precision": "32-true",
                    "global_batch_size": GLOBAL_BATCH},
    }


def make_run(devices: int, steps: int, **overrides):
    """The run of `config(devices, steps)`: same initial weights in every process."""
    from blip3o_mini.training.generation import GenerationModule
    from blip3o_mini.training.generation_run import generation_run

    class SampleSeededModule(GenerationModule):
        def training_step(self, batch, batch_idx):
            prompts, features, index = batch
            g = self.generator
            x_1 = g.normalize(features)  # (B, 64, F)
            x_0, t = sample_noise(index, self.current_epoch, x_1.shape[1:])
            out = g.flow.loss(g.dit, x_1, g.condition(self.backbone, prompts), x_0=x_0, t=t)
            mean = self.trainer.strategy.reduce(out.loss.detach(), reduce_op="mean")  # over ranks
            self.losses.append((int(self.global_step) + 1, float(mean)))
            return out.loss

    torch.manual_seed(0)
    backbone = TinyBackbone(K, ffn=32, dropout=0.0)
    return generation_run(config(devices, steps), backbone, IndexedDataset(), F,
                          module_cls=SampleSeededModule, collate_fn=collate_indexed, **overrides)


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.generator.state_dict().items()}


def main(argv=None) -> int:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from blip3o_mini.artifacts import save_tensors

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--resume-at", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process: N processes share a small CPU
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=args.resume_at,
                                 save_top_k=-1)
    full = make_run(args.devices, args.steps, callbacks=[checkpoint])
    trainer = full.fit()
    resumed = make_run(args.devices, args.steps)
    resumed.fit(ckpt_path=str(ckpt_dir / f"step={args.resume_at}.ckpt"), enable_checkpointing=False)
    if trainer.global_rank == 0:
        save_tensors(out / "full.safetensors", weights(full.module))
        save_tensors(out / "resumed.safetensors", weights(resumed.module))
        result = {"devices": args.devices, "world_size": trainer.world_size,
                  "global_batch_size": full.global_batch_size,
                  "losses_full": full.module.losses, "losses_resumed": resumed.module.losses}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
