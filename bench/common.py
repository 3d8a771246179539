"""What every benchmark shares: device-synchronized timing, peak rates, tables, JSON and profiles.

Timing follows ../shared/anchors/h100-peers.md so our numbers compare with the peers': a jitted call,
warm-ups, then the median over repeats of `calls` back-to-back calls, synchronized at the end of each
repeat.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax

# bf16 dense matmul ceilings measured on the device (8192^3 product), TFLOP/s.
MEASURED_BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 778.0}


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}), JAX {jax.__version__}"


def peak_tflops() -> float | None:
    return MEASURED_BF16_PEAK_TFLOPS.get(jax.devices()[0].device_kind)


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
    """`row` with fwd_ms and fwd_bwd_ms from measure() -> (fwd ms, fwd+bwd ms), their TF/s and
    percent of the device peak; or with an error (out of memory, unsupported here) — the sweep goes on."""
    peak = peak_tflops()
    try:
        row["fwd_ms"], row["fwd_bwd_ms"] = measure()
        for key, flops in (("fwd", fwd_flops), ("fwd_bwd", fwd_bwd_flops)):
            row[f"{key}_tflops"] = tflops(flops, row[f"{key}_ms"])
            if peak:
                row[f"{key}_peak_pct"] = 100 * row[f"{key}_tflops"] / peak
    except Exception as e:  # noqa: BLE001 - report the failure in the table and go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}"
    return row


def add_ratios(rows: list[dict], baseline_impl: str) -> None:
    """row["fwd_vs_<baseline>"] = the baseline's time / the row's (above 1: faster), same for fwd_bwd."""
    base = next((r for r in rows if r["impl"] == baseline_impl and "error" not in r), None)
    for row in rows:
        if base and "error" not in row:
            row[f"fwd_vs_{baseline_impl}"] = base["fwd_ms"] / row["fwd_ms"]
            row[f"fwd_bwd_vs_{baseline_impl}"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]


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


def write_json(path: str | Path, records: list[dict], command: str | None = None) -> None:
    meta = {"command": command or " ".join(sys.argv), "device": device_description(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")


@contextlib.contextmanager
def maybe_profile(directory: str | None):
    """jax.profiler trace into `directory` (TensorBoard's profile plugin reads it), or nothing."""
    if directory is None:
        yield
        return
    from microgpt.train import profiler_options

    with jax.profiler.trace(directory, profiler_options=profiler_options()):
        yield
    print(f"profile written to {directory} (open with: tensorboard --logdir {directory})")
