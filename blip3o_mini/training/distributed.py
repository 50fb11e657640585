"""Trainer settings shared by every stage: devices, nodes, strategy, precision (the `trainer:`
section of a config), and the command-line flags that override them.

Multi-GPU is configuration only (DESIGN.md section 4): the toy run and BLIP3-o's 32-GPU run
(4 nodes x 8 GPUs, global batch 512 = 16 per GPU, bf16, DeepSpeed ZeRO-1) build their
`lightning.Trainer` from this one section. Lightning reads the rank and world size from the
launcher (`torchrun`, SLURM or its own `ddp` launcher), so the same command runs on one CPU or
many GPUs; see `scripts/launch/`.

Data sharding is ours (`data/sharding.py`), so Lightning is told not to insert its own
`DistributedSampler` (`use_distributed_sampler=False`).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass

from ..config import build
from .attention_kernel import check_attention, runs_on_cpu

STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp",
              "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


@dataclass
class TrainerConfig:
    """Defaults: one device, fp32, no accumulation (the toy CPU run)."""

    accelerator: str = "auto"  # "cpu", "gpu", "auto"
    devices: int | str = 1  # per node; "auto" = every visible device
    num_nodes: int = 1
    strategy: str = "auto"  # ddp | fsdp | deepspeed_stage_1 (BLIP3-o: ZeRO-1) | ...
    precision: str = "32-true"  # "bf16-mixed" on GPUs (BLIP3-o trains in bf16)
    accumulate_grad_batches: int = 1
    global_batch_size: int | None = None  # if set: checked against batch_size x devices x nodes x accumulation
    attention: str = "auto"  # SDPA kernel: auto (math on CPU, fused on GPU), math, default (attention_kernel.py)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown trainer.strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        check_attention(self.attention)
        if self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.num_nodes and trainer.accumulate_grad_batches must be >= 1, got "
                             f"{self.num_nodes} and {self.accumulate_grad_batches}")
        if self.precision.startswith("16"):
            raise ValueError("fp16 is not supported (100x slow on CPUs, and BLIP3-o trains in bf16); "
                             "use precision 'bf16-mixed' or '32-true'")

    @property
    def world_size(self) -> int | None:
        """Processes in the job, or None while `devices` is left to Lightning ("auto", -1)."""
        if isinstance(self.devices, int) and self.devices > 0:
            return self.devices * self.num_nodes
        return None


def trainer_config(cfg: dict) -> TrainerConfig:
    """The `trainer:` section of a whole config as a `TrainerConfig`."""
    return build(TrainerConfig, cfg.get("trainer"))


def stage_trainer_config(cfg: dict, recipe_precision: str) -> TrainerConfig:
    """The `trainer:` section for one stage: its precision when the section sets one (the whole
    job's hardware setting), else the stage recipe's `train.precision`, which on a CPU without
    bf16 instructions is fp32 (`recipe_precision_here`)."""
    tc = trainer_config(cfg)
    if "precision" not in (cfg.get("trainer") or {}):
        tc.precision = recipe_precision_here(recipe_precision, tc.accelerator)
    return tc


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), as the toy recipes assume."""
    import torch

    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def recipe_precision_here(precision: str, accelerator: str) -> str:
    """A recipe's bf16 on a CPU without bf16 instructions becomes "32-true": there every bf16
    product is emulated, and a toy CLIP step took 2.4 s in bf16 against 0.84 s in fp32
    (`benchmarks/bench_clip_step.py --precision`). Set `trainer.precision` to force bf16."""
    if precision.startswith("bf16") and runs_on_cpu(accelerator) and not cpu_has_bf16():
        print(f"precision: {precision} asked, 32-true used (this CPU has no bf16 instructions; "
              "set trainer.precision to force it)", flush=True)
        return "32-true"
    return precision


def check_global_batch(tc: TrainerConfig, batch_size: int) -> int:
    """The global batch of a run with `batch_size` samples per device and step; a ValueError
    when it differs from `tc.global_batch_size`."""
    world = tc.world_size
    if world is None:
        if tc.global_batch_size is not None:
            raise ValueError(f"trainer.global_batch_size is {tc.global_batch_size} but trainer.devices is "
                             f"{tc.devices!r}; give devices as a number so the batch can be checked")
        return batch_size * tc.accumulate_grad_batches
    total = batch_size * world * tc.accumulate_grad_batches
    if tc.global_batch_size is not None and total != tc.global_batch_size:
        raise ValueError(
            f"global batch {batch_size} per device x {tc.devices} devices x {tc.num_nodes} nodes x "
            f"{tc.accumulate_grad_batches} accumulation = {total}, but trainer.global_batch_size is "
            f"{tc.global_batch_size}; change the per-device batch_size or accumulate_grad_batches")
    return total


def trainer_kwargs(tc: TrainerConfig, **overrides) -> dict:
    """Keyword arguments for `lightning.Trainer` (stage-specific ones, e.g. `max_steps`,
    `gradient_clip_val`, `callbacks`, go in `overrides`)."""
    from .kernel_callback import AttentionKernel

    kw = {k: v for k, v in asdict(tc).items() if k not in ("global_batch_size", "attention")}
    kw["use_distributed_sampler"] = False  # data/sharding.py shards the data
    kw["callbacks"] = [AttentionKernel(tc.attention, tc.accelerator)]  # ddp_spawn workers too
    return merge_trainer_kwargs(kw, overrides)


def merge_trainer_kwargs(kw: dict, overrides: dict) -> dict:
    """`kw | overrides`, except that callbacks add up instead of replacing each other."""
    callbacks = [*kw.get("callbacks", []), *overrides.get("callbacks", [])]
    return kw | overrides | {"callbacks": callbacks}


def make_trainer(tc: TrainerConfig, **overrides):
    import lightning as L

    return L.Trainer(**trainer_kwargs(tc, **overrides))


# ------------------------------------------------------------------------------ command line
FLAGS = {  # flag -> (TrainerConfig field, type)
    "--accelerator": ("accelerator", str),
    "--devices": ("devices", lambda s: s if s == "auto" else int(s)),
    "--num-nodes": ("num_nodes", int),
    "--strategy": ("strategy", str),
    "--precision": ("precision", str),
    "--accumulate-grad-batches": ("accumulate_grad_batches", int),
}


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """`--devices 8 --num-nodes 4 --strategy deepspeed_stage_1 --precision bf16-mixed ...`."""
    group = parser.add_argument_group("trainer (override the config's trainer: section)")
    for flag, (name, kind) in FLAGS.items():
        group.add_argument(flag, dest=f"trainer_{name}", type=kind, default=None,
                           help=f"trainer.{name}" + (f" ({', '.join(STRATEGIES)})" if name == "strategy" else ""))


def apply_trainer_arguments(cfg: dict, args: argparse.Namespace) -> dict:
    """A copy of `cfg` with the flags that were given written into its `trainer:` section."""
    out = copy.deepcopy(cfg)
    section = dict(out.get("trainer") or {})
    for name, _ in FLAGS.values():
        value = getattr(args, f"trainer_{name}", None)
        if value is not None:
            section[name] = value
    out["trainer"] = section
    trainer_config(out)  # validate now: a bad flag is one clear line, before anything loads
    return out
