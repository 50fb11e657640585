"""Stage 2 as a config describes it, at any scale: the generator, the LightningModule, the
sharded data and the Trainer, from the `generation:` and `trainer:` sections.

The toy CPU run, the one-GPU `small` run and BLIP3-o's 32-GPU run go through this one function;
only the config (and the backbone / CLIP encoder handed in) differ. `generation.train.batch_size`
is per device: the global batch is batch_size x devices x num_nodes x accumulate_grad_batches
(checked against `trainer.global_batch_size` when the config gives it, 512 for full runs).

Precision: the `trainer:` section's when it sets one (the whole job's hardware setting), else
the stage recipe's `generation.train.precision`.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L

from ..data.sharding import ShardedDataModule
from ..describe import generation_configs
from ..generation import Blip3oGenerator
from .attention_kernel import runs_on_cpu
from .compile import use_compile
from .distributed import check_global_batch, merge_trainer_kwargs, stage_trainer_config, trainer_kwargs
from .generation import GenerationModule, GenerationTrainConfig, collate


@dataclass
class GenerationRun:
    module: GenerationModule
    data: ShardedDataModule
    trainer_kwargs: dict
    train_cfg: GenerationTrainConfig
    global_batch_size: int

    def trainer(self, **overrides) -> L.Trainer:
        return L.Trainer(**merge_trainer_kwargs(self.trainer_kwargs, overrides))

    def fit(self, ckpt_path: str | None = None, **overrides) -> L.Trainer:
        trainer = self.trainer(**overrides)
        trainer.fit(self.module, datamodule=self.data, ckpt_path=ckpt_path)
        return trainer


def build_generator(cfg: dict, feature_dim: int, cond_dim: int, feature_mean=None, feature_std=None) -> Blip3oGenerator:
    gen_cfg, _, _ = generation_configs(cfg)
    return Blip3oGenerator(gen_cfg, feature_dim=feature_dim, cond_dim=cond_dim,
                           feature_mean=feature_mean, feature_std=feature_std)


def generation_run(cfg: dict, backbone, dataset, feature_dim: int, *, encoder=None, generator=None,
                   feature_mean=None, feature_std=None, module_cls=None, collate_fn=collate,
                   **trainer_overrides) -> GenerationRun:
    """Everything `trainer.fit` needs for stage 2. `dataset` yields (prompt, features (N, D)) for
    `generation.targets: features` or (prompt, uint8 image) for `images` (then `encoder`, the
    frozen ClipEncoder, is required). `module_cls` / `collate_fn` swap in a GenerationModule
subclass and its batch format (tests/ddp_script.py adds sample indices for fixed noise)."""
    from ..targets import generation_module

    _, train_cfg, targets = generation_configs(cfg)
    tc = stage_trainer_config(cfg, train_cfg.precision)
    global_batch = check_global_batch(tc, train_cfg.batch_size)
    if generator is None:
        generator = build_generator(cfg, feature_dim, backbone.hidden_size, feature_mean, feature_std)
    if module_cls is not None:
        module = module_cls(generator, backbone, train_cfg)
    else:
        module = generation_module(targets, generator, backbone, train_cfg, encoder)
    # `compile: auto` looks for the compiler of the device the trainer runs on (a C++ compiler
    # for `accelerator: cpu`, even on a machine with a GPU; Triton for GPUs), not this machine's.
    module.compiled = use_compile(train_cfg.compile, cuda=not runs_on_cpu(tc.accelerator))
    # A compiled DiT wants one batch shape: an epoch's ragged last batch would compile it again.
    data = ShardedDataModule(dataset, train_cfg.batch_size, collate_fn=collate_fn, seed=train_cfg.seed,
                             num_workers=train_cfg.num_workers, drop_last=module.compiled)
    kwargs = trainer_kwargs(tc, max_steps=train_cfg.max_steps, gradient_clip_val=train_cfg.grad_clip,
                            logger=False, enable_progress_bar=False, enable_model_summary=False, **trainer_overrides)
    return GenerationRun(module, data, kwargs, train_cfg, global_batch)
