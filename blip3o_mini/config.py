"""Run configuration: one YAML file per scale (`configs/toy.yaml` ... `configs/full-8b.yaml`).

The toy and full runs share one code path; a config only changes numbers and names. Sections
map onto stages (`data`, `clip`, `understanding`, `generation`, `decoder`, `evaluation`); each
stage turns its section into its own small dataclass.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "toy"


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist; pass a path to a YAML file "
                                    f"or one of: {', '.join(available_configs())}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise FileNotFoundError(f"unknown config {str(name_or_path)!r}; choose one of: "
                                f"{', '.join(available_configs())} or pass a .yaml path")
    return candidate


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def deep_update(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name_or_path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    """Load a config; a file may start from another with `base: toy` and override sections."""
    path = resolve_config_path(name_or_path)
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping of sections")
    base = cfg.pop("base", None)
    return deep_update(load_config(base), cfg) if base else cfg


def build(cls, section: dict | None):
    """Instantiate a config dataclass from a YAML section, naming any unknown key."""
    section = dict(section or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
    return cls(**section)


def with_run_seed(train_cfg, cfg: dict, train_section: dict | None):
    """`train_cfg` with the run's `seed:` where the stage's `train:` leaves `seed` out, so one
    line of a config draws every stage's start and data order (a stage's own seed still wins)."""
    if "seed" not in (train_section or {}):
        train_cfg.seed = cfg.get("seed", 0)
    return train_cfg


def relation_rule(cfg: dict) -> str:
    """The rule a run's ShapesWorld text states relations by (`data.relation_rule`, the toy's when
    unset): whatever reads or re-asks its captions and questions must state them the same way."""
    from .data.world import DEFAULT_RELATION_RULE

    return cfg.get("data", {}).get("relation_rule", DEFAULT_RELATION_RULE)
