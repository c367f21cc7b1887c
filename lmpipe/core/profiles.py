"""Profiles: named sets of params sharing every line of code (default, smoke, gpu, ...).

The schema's defaults (lmpipe/core/params.py) *are* the default profile: `params.yaml` is
their dump. Every other profile is a small overlay, `profiles/<name>.yaml`, on top of them.
`lmpipe profile NAME` writes the merged result to `params.yaml`, so DVC sees ordinary params
changes and records them in `dvc.lock` (lineage is kept whichever profile ran).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from lmpipe.core.errors import InputError
from lmpipe.core.params import Params, read_yaml, validate_params

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def default_params_dict() -> dict:
    return Params().model_dump(mode="json")


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def available_profiles() -> list[str]:
    return ["default"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_dict(name: str) -> dict:
    """The full params of a profile: schema defaults, then the profile's overlay."""
    base = default_params_dict()
    if name == "default":
        return base
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise InputError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    overlay = read_yaml(path) or {}
    merged = deep_merge(base, overlay)
    validate_params(merged, str(path))
    return merged


def dump_params(params: dict) -> str:
    header = (
        "# lmpipe params: one section per stage (see README). Validated by lmpipe/core/params.py;\n"
        "# regenerate a profile with `lmpipe profile default|smoke|gpu`.\n"
    )
    return header + yaml.safe_dump(params, sort_keys=False, default_flow_style=False, width=100)
