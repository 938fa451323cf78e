"""The config schema's defaults, read where code needs one (the schema is their only source).

``balancedbio/schemas/config.schema.yaml`` (package data) gives every key its default; Snakemake and
``balancedbio.config.load_config`` fill them into a run's config. Code that also runs without
a filled config (the typed ``BalancedGRPOConfig``, partial dicts in tests and notebooks) reads
them from here instead of repeating the numbers. Free of torch imports, like ``variants``.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# Package data (importlib.resources), so a wheel or a non-editable install finds it too;
# workflow/schemas/config.schema.yaml is a link to this file for Snakemake's validate().
SCHEMA_PATH = Path(str(resources.files("balancedbio") / "schemas" / "config.schema.yaml"))


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _properties(section: str) -> dict:
    try:
        return _schema()["properties"][section]["properties"]
    except KeyError:
        raise KeyError(f"config section {section!r} is not in {SCHEMA_PATH}") from None


def schema_default(section: str, key: str) -> Any:
    """The default of ``section.key``; KeyError naming the key when the schema has none."""
    spec = _properties(section).get(key)
    if spec is None or "default" not in spec:
        raise KeyError(f"{section}.{key} has no default in {SCHEMA_PATH}")
    return copy.deepcopy(spec["default"])


def schema_description(section: str, key: str) -> str:
    """The schema's description of ``section.key`` (one line), or an empty string."""
    return " ".join(str(_properties(section).get(key, {}).get("description", "")).split())


def with_defaults(section: str, values: dict | None) -> dict:
    """``values`` over the section's schema defaults (keys without a default are left out)."""
    filled = {key: copy.deepcopy(spec["default"]) for key, spec in _properties(section).items() if "default" in spec}
    filled.update(values or {})
    return filled
