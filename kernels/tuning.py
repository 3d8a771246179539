"""Block sizes for every kernel, per op, implementation and device, in layered tables.

A table (JSON) maps a device kind (jax.Device.device_kind, e.g. "NVIDIA H200") to entries
"op/implementation" -> {shape key or "*": {parameter: value}}, and "op" -> {shape key:
implementation} (the implementation measured fastest there, `preferred_implementation`). Its
"architectures" maps an architecture ("sm90": compute capability 9.0, every Hopper GPU) to the
device whose entries serve every device of that architecture that has none of its own, so tiles
measured on one Hopper serve an H100 PCIe, an H800 or a GH200 until that device is tuned.

Two tables: the user's cache (`user_table_path`: $MICROGPT_TUNING, else
~/.cache/microgpt/tuning.json), which `python bench/tune.py` writes by default, over the table
shipped with the kernels (kernels/tuning.json). For an op's implementation at a shape key the
first of these that has an entry wins, whole: the user's entry for this device kind, the shipped
one, the user's for the architecture, the shipped one, then the op's defaults; a caller's
explicit overrides win over all (`block_config`). Within an entry a shape key narrows with
underscores: "d128_s8192" (head_dim 128 at sequences up to 8192) layers over "d128" and "*", and
a mask's tag narrows further: "d128_s8192_docs" (segment ids) over "d128_docs", then those.
`lookup` says which entry a call used; `used_entries` lists those the calls so far used.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import jax

from microgpt import files

TABLE_PATH = Path(__file__).with_name("tuning.json")


def user_table_path() -> Path:
    """The user's tuning cache: $MICROGPT_TUNING, else $XDG_CACHE_HOME (default ~/.cache)
    /microgpt/tuning.json."""
    if os.environ.get("MICROGPT_TUNING"):
        return Path(os.environ["MICROGPT_TUNING"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "microgpt" / "tuning.json"


def read_table(path: Path) -> dict:
    """The table at `path`; {} if there is none. Any table but the shipped one that cannot be
    read gives one warning naming the file and is ignored (the shipped table must read)."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return table
    except (OSError, ValueError) as err:
        if path == TABLE_PATH:
            raise
        print(f"warning: ignoring the tuning cache {path}: {err}", file=sys.stderr)
        return {}


@functools.cache
def _tables() -> tuple[tuple[str, dict], ...]:
    """(source, table), the user's cache first."""
    user = user_table_path()
    return ((f"user cache {user}", read_table(user)), ("shipped", read_table(TABLE_PATH)))


def clear_cache() -> None:
    """Read the tables again at the next lookup (after bench/tune.py wrote one)."""
    _tables.cache_clear()


def device_kind() -> str:
    return jax.devices()[0].device_kind


def architecture() -> str | None:
    """"sm90" for a GPU of compute capability 9.0 (every Hopper), None elsewhere."""
    capability = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    return "sm" + capability.replace(".", "") if capability else None


@dataclasses.dataclass(frozen=True)
class Entry:
    """Which table entry a lookup used: its source ("user cache PATH", "shipped" or "defaults"),
    its section (the device kind, or "sm90 (NVIDIA H100 ...)" for an architecture's), the
    narrowest shape key it matched, and the values it gave (over the op's defaults)."""
    op: str
    implementation: str
    shape_key: str
    source: str
    section: str | None
    matched: str | None
    values: dict

    def describe(self) -> str:
        where = (f"{self.section} [{self.matched}] from the {self.source} table"
                 if self.section else "the defaults (no tuned entry)")
        return f"{self.op}/{self.implementation} at {self.shape_key}: {where}"


def _sections():
    """(source, section name, section) in precedence order: this device kind in each table, then
    its architecture's device in each."""
    kind, arch = device_kind(), architecture()
    for source, table in _tables():
        if kind in table:
            yield source, kind, table[kind]
    for source, table in _tables():
        serving = table.get("architectures", {}).get(arch) if arch else None
        if serving in table:
            yield source, f"{arch} ({serving})", table[serving]


def shape_key_prefixes(shape_key: str) -> list[str]:
    """"d128_s8192" -> ["d128", "d128_s8192"]: the keys that apply, widest first. A last part of
    letters only is a mask's tag, which narrows every key before it: "d128_s8192_docs" ->
    ["d128", "d128_s8192", "d128_docs", "d128_s8192_docs"]."""
    *parts, last = shape_key.split("_")
    if parts and last.isalpha():
        plain = shape_key_prefixes("_".join(parts))
        return plain + [f"{key}_{last}" for key in plain]
    parts.append(last)
    return ["_".join(parts[:n]) for n in range(1, len(parts) + 1)]


def layered_entry(entries: dict, shape_key: str) -> dict:
    """One implementation's table entries {key: config} merged for shape_key: "*", then each
    prefix of shape_key, the narrower over the wider."""
    config = dict(entries.get("*", {}))
    for key in shape_key_prefixes(shape_key):
        config.update(entries.get(key, {}))
    return config


_USED: dict[tuple[str, str, str], Entry] = {}


def lookup(op: str, implementation: str, shape_key: str) -> Entry:
    """The entry `op` run by `implementation` at shape_key takes on this device (see the module
    docstring for the order), recorded for `used_entries`."""
    entry = Entry(op, implementation, shape_key, "defaults", None, None, {})
    for source, name, section in _sections():
        entries = section.get(f"{op}/{implementation}", {})
        matched = [key for key in ["*", *shape_key_prefixes(shape_key)] if key in entries]
        if matched:
            entry = Entry(op, implementation, shape_key, source, name, matched[-1],
                          layered_entry(entries, shape_key))
            break
    _USED[op, implementation, shape_key] = entry
    return entry


def used_entries(clear: bool = False) -> list[Entry]:
    """The entries the kernels' lookups used so far in this process (since the last clear), one
    per (op, implementation, shape key)."""
    used = list(_USED.values())
    if clear:
        _USED.clear()
    return used


def block_config(op: str, implementation: str, shape_key: str, defaults: dict,
                 overrides: dict | None = None) -> dict:
    """Parameters for `op` run by `implementation` at `shape_key` on the current device: the
    defaults, under the entry `lookup` finds, under the caller's overrides. Unknown parameter
    names in overrides raise, so a typo never silently does nothing; so do a table entry's, naming
    the table (a user's cache from before a parameter's rename, say)."""
    entry = lookup(op, implementation, shape_key)
    stale = sorted(set(entry.values) - set(defaults))
    if stale:
        raise ValueError(f"{entry.describe()} sets {stale[0]!r}, which the kernels no longer take "
                         f"(known: {sorted(defaults)}); delete that entry, or run bench/tune.py "
                         "again")
    config = {**defaults, **entry.values}
    for name, value in (overrides or {}).items():
        if name not in defaults:
            raise ValueError(f"{op}/{implementation} has no tuning parameter {name!r}; "
                             f"known: {sorted(defaults)}")
        if value is not None:
            config[name] = value
    return config


def preferred_implementation(op: str, shape_key: str) -> str | None:
    """The implementation of `op` that bench/tune.py measured fastest at shape_key, or at its
    narrowest prefix that was measured, in the first section (`lookup`'s order) that measured
    it; None where none did."""
    for _, _, section in _sections():
        preferences = section.get(op, {})
        measured = [preferences[key] for key in shape_key_prefixes(shape_key) if key in preferences]
        if measured:
            return measured[-1]
    return None


def _update(path: Path, device: str, entry: str, shape_key: str, value) -> None:
    """table[device][entry][shape_key] = value, written atomically (a crash leaves the old file)."""
    table = read_table(path)
    table.setdefault(device, {}).setdefault(entry, {})[shape_key] = value
    files.write_text(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
    clear_cache()


def record(device: str, op: str, implementation: str, shape_key: str, config: dict,
           path: Path) -> None:
    """Write one measured configuration into the table at `path` (used by bench/tune.py)."""
    _update(path, device, f"{op}/{implementation}", shape_key, config)


def record_preferred(device: str, op: str, shape_key: str, implementation: str,
                     path: Path) -> None:
    """Write which implementation of `op` was measured fastest at shape_key."""
    _update(path, device, op, shape_key, implementation)


def _key_order(shape_key: str) -> list[tuple]:
    """Sorts shape keys by their numbers ("d64_s512" before "d64_s1024"), tags after numbers."""
    return [(0, int(p[1:]), "") if p[1:].isdigit() else (1, 0, p) for p in shape_key.split("_")]


def preferences_markdown(table: dict | None = None) -> str:
    """The implementation preferences of a table (default: the shipped one) as a markdown table,
    one row per device, op and implementation with the shape keys it was measured fastest at.
    README's kernel section holds the shipped table's (tests/test_readme.py checks they agree)."""
    table = read_table(TABLE_PATH) if table is None else table
    rows = ["| device | op | implementation | measured fastest at |", "|---|---|---|---|"]
    for device, section in sorted(table.items()):
        if device == "architectures":
            continue
        for op, preferences in sorted((k, v) for k, v in section.items() if "/" not in k):
            for implementation in sorted(set(preferences.values())):
                keys = sorted((k for k, v in preferences.items() if v == implementation),
                              key=_key_order)
                rows.append(f"| {device} | {op} | {implementation} | {', '.join(keys)} |")
    serving = "; ".join(f"{arch}: {device}" for arch, device in
                        sorted(table.get("architectures", {}).items()))
    return "\n".join(rows) + (f"\n\nWhere a device has no entry of its own, its architecture's "
                              f"device's applies ({serving}).\n" if serving else "\n")
