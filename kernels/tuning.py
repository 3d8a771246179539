"""Block sizes for every kernel, per op, implementation and device, in one table.

`kernels/tuning.json` maps a device kind (jax.Device.device_kind, e.g. "NVIDIA H100 80GB HBM3") to
entries "op/implementation" -> {shape key or "*": {parameter: value}}. The kernels ask `block_config`
for their parameters; measured entries (written by `python bench/tune.py`) override each op's defaults,
and a caller's explicit overrides win over both. A shape key narrows with underscores: "d128_s8192"
(head_dim 128 at sequences up to 8192) layers its entry over "d128"'s, so a table needs the
narrower keys only where they were measured to differ. Where an op has several implementations for one
device, the entry "op" -> {shape key: implementation} names the one measured fastest there
(`preferred_implementation`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax

TABLE_PATH = Path(__file__).with_name("tuning.json")


@functools.cache
def _table() -> dict:
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


def device_kind() -> str:
    return jax.devices()[0].device_kind


def block_config(op: str, implementation: str, shape_key: str, defaults: dict,
                 overrides: dict | None = None) -> dict:
    """Parameters for `op` run by `implementation` at `shape_key` on the current device.

    Precedence: overrides > the table's entry for shape_key > those of its prefixes up to an
    underscore, narrowest first ("d128_s8192" > "d128") > its "*" entry > defaults.
    Unknown parameter names in overrides raise, so a typo never silently does nothing.
    """
    entries = _table().get(device_kind(), {}).get(f"{op}/{implementation}", {})
    config = {**defaults, **layered_entry(entries, shape_key)}
    for name, value in (overrides or {}).items():
        if name not in defaults:
            raise ValueError(f"{op}/{implementation} has no tuning parameter {name!r}; "
                             f"known: {sorted(defaults)}")
        if value is not None:
            config[name] = value
    return config


def shape_key_prefixes(shape_key: str) -> list[str]:
    """"d128_s8192" -> ["d128", "d128_s8192"]: the keys that apply, widest first."""
    parts = shape_key.split("_")
    return ["_".join(parts[:n]) for n in range(1, len(parts) + 1)]


def layered_entry(entries: dict, shape_key: str) -> dict:
    """One implementation's table entries {key: config} merged for shape_key: "*", then each
    prefix of shape_key, the narrower over the wider."""
    config = dict(entries.get("*", {}))
    for key in shape_key_prefixes(shape_key):
        config.update(entries.get(key, {}))
    return config


def preferred_implementation(op: str, shape_key: str) -> str | None:
    """The implementation of `op` that bench/tune.py measured fastest at shape_key, or at its
    narrowest prefix that was measured, on this device."""
    preferences = _table().get(device_kind(), {}).get(op, {})
    measured = [preferences[key] for key in shape_key_prefixes(shape_key) if key in preferences]
    return measured[-1] if measured else None


def _update(path: Path, device: str, entry: str, shape_key: str, value) -> None:
    """table[device][entry][shape_key] = value, written atomically."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device, {}).setdefault(entry, {})[shape_key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    _table.cache_clear()


def record(device: str, op: str, implementation: str, shape_key: str, config: dict,
           path: Path = TABLE_PATH) -> None:
    """Write one measured configuration into the table (used by the sweep script)."""
    _update(path, device, f"{op}/{implementation}", shape_key, config)


def record_preferred(device: str, op: str, shape_key: str, implementation: str,
                     path: Path = TABLE_PATH) -> None:
    """Write which implementation of `op` was measured fastest at shape_key."""
    _update(path, device, op, shape_key, implementation)
