"""What every benchmark shares: device-synchronized timing, peak rates, tables, JSON and profiles.

Timing follows ../shared/anchors/h100-peers.md so our numbers compare with the peers': a jitted call,
warm-ups, then the median over repeats of `calls` back-to-back calls, synchronized at the end of each
repeat.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import json
import statistics
import sys
import time
from pathlib import Path

# PyTorch's peers (bench/torch_peers.py) allocate beside JAX in one process: JAX takes the GPU's
# memory as it needs it rather than 75% of it at start (read when JAX starts its backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting

from kernels import tuning  # noqa: E402
from microgpt import files  # noqa: E402
from microgpt.profiling import profiler_options  # noqa: E402

# bf16 dense matmul ceilings measured on the device (8192^3 product, bench/peak.py), TFLOP/s.
MEASURED_BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 778.0, "NVIDIA H200": 717.0}
# The datasheets' dense bf16 peaks (no sparsity), the convention of the MFU figures the field
# publishes (H100 and H200 SXM: the same tensor cores and clocks).
DATASHEET_BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}), JAX {jax.__version__}"


def peak_tflops(datasheet: bool = False) -> float | None:
    """The device's bf16 dense peak, measured here (default) or its datasheet's; None if unknown."""
    table = DATASHEET_BF16_PEAK_TFLOPS if datasheet else MEASURED_BF16_PEAK_TFLOPS
    return table.get(jax.devices()[0].device_kind)


def time_ms(fn, *args, warmup: int = 2, repeats: int = 5, calls: int = 20) -> float:
    """Median milliseconds of one call of `fn(*args)` (fn should be jitted)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(per_call)


def peak_bytes(compiled) -> int:
    """What a compiled computation holds at once by XLA's memory analysis: its arguments, outputs
    and temporaries, less the outputs that reuse donated arguments (inputs included, as PyTorch's
    max_memory_allocated counts them)."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def int_list(text: str) -> list[int]:
    """"512,1024" -> [512, 1024] (a command-line list)."""
    return [int(x) for x in text.split(",") if x]


def add_timing_args(parser) -> None:
    """--warmup, --repeats, --calls and --full; on CPU the kernels are interpreted: one call
    smoke-tests."""
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--warmup", type=int, default=1 if on_cpu else 2)
    parser.add_argument("--repeats", type=int, default=1 if on_cpu else 5)
    parser.add_argument("--calls", type=int, default=1 if on_cpu else 20)
    add_full_arg(parser)


def add_full_arg(parser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="on a CPU too, the sizes asked for (see `smoke_size`)")


def smoke_size(full: bool) -> bool:
    """Whether a benchmark shrinks its sizes to a smoke test (each says which): on a CPU, where
    the Pallas kernels run in interpret mode and a GPU's shapes take hours, unless --full. Says
    so when it does."""
    if jax.default_backend() != "cpu" or full:
        return False
    print("cpu: the Pallas kernels run in interpret mode here, so this is a smoke test at small "
          "sizes (--full: the sizes asked for)", flush=True)
    return True


def timed_row(row: dict, measure, fwd_flops: float, fwd_bwd_flops: float) -> dict:
    """`row` with fwd_ms and fwd_bwd_ms from measure() -> (fwd ms, fwd+bwd ms[, peak bytes]), their TF/s,
    percent of the device peak and the tuning entries our kernels used (kernels.tuning.lookup);
    or with an error (out of memory, unsupported here) — the sweep goes on."""
    peak = peak_tflops()
    tuning.used_entries(clear=True)
    try:
        row["fwd_ms"], row["fwd_bwd_ms"], *memory = measure()
        if memory:
            row["peak_gib"] = memory[0] / 2**30
        if used := tuning.used_entries(clear=True):   # which table entries our kernels took
            row["tuning"] = [dataclasses.asdict(entry) for entry in used]
        for key, flops in (("fwd", fwd_flops), ("fwd_bwd", fwd_bwd_flops)):
            row[f"{key}_tflops"] = tflops(flops, row[f"{key}_ms"])
            if peak:
                row[f"{key}_peak_pct"] = 100 * row[f"{key}_tflops"] / peak
    except Exception as e:  # noqa: BLE001 - report the failure in the table and go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}"
    return row


def add_ratios(rows: list[dict], baselines: tuple[str, ...], label: str) -> None:
    """row["fwd_vs_<label>"] = the fastest baseline's time / the row's (above 1: faster), the
    fastest of `baselines` measured in these rows, and the same for fwd_bwd (its own fastest)."""
    measured = [r for r in rows if r["impl"] in baselines and "error" not in r]
    for key in ("fwd", "fwd_bwd"):
        if not measured:
            return
        best = min(measured, key=lambda r: r[f"{key}_ms"])
        for row in rows:
            if "error" not in row:
                row[f"{key}_vs_{label}"] = best[f"{key}_ms"] / row[f"{key}_ms"]
                row[f"{key}_{label}_impl"] = best["impl"]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> aligned text table; columns are (key, header, format spec)."""
    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    body = [[cell(r, k, spec) for k, _, spec in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(b) for b in body)])


def report(records: list[dict], columns, json_path: str | None, script: str,
           argv: list[str] | None) -> None:
    """Print the records as a table; with --json also write them, with the command that ran
    (`python bench/<script> <its flags>`)."""
    print(format_table(records, columns))
    if json_path:
        write_json(json_path, records,
                   command=" ".join([f"python bench/{script}", *(argv or sys.argv[1:])]))


def write_json(path: str | Path, records: list[dict], command: str | None = None) -> None:
    meta = {"command": command or " ".join(sys.argv), "device": device_description(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    files.write_text(path, json.dumps({"meta": meta, "records": records}, indent=2) + "\n")


@contextlib.contextmanager
def maybe_profile(directory: str | None):
    """jax.profiler trace into `directory` (TensorBoard's profile plugin reads it), or nothing."""
    if directory is None:
        yield
        return
    with jax.profiler.trace(directory, profiler_options=profiler_options()):
        yield
    print(f"profile written to {directory} (open with: tensorboard --logdir {directory})")
