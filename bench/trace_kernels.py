"""The ops that took the most time in a jax.profiler capture, read with TensorBoard's profile plugin.

    python bench/trace_kernels.py profiles/pallas                 # top 20 by total time
    python bench/trace_kernels.py profiles/pallas --device        # GPU kernels only, with shares
    python bench/trace_kernels.py profiles/pallas --expect flash_attention_fwd,layernorm_ffn

It converts the capture's .xplane.pb with the plugin's own converter (xprof, the `profile` extra)
into the trace viewer's events — what TensorBoard draws — and prints the names with the most time.
`--expect` exits non-zero unless every named kernel appears, so a GPU run can check that the
Pallas kernels, not a fallback, did the work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def event_totals(capture_dir: str | Path, device_only: bool = False) -> dict[str, tuple[float, int]]:
    """name -> (total microseconds, count) over the complete events of the newest capture under
    `capture_dir` (on a GPU: the kernels on the device streams, by name, and the host's calls;
    with device_only, the events of the accelerators' timelines alone)."""
    from xprof.convert import raw_to_tool_data  # the `profile` extra

    paths = sorted(Path(capture_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb capture under {capture_dir}")
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(paths[-1])], "trace_viewer", {})
    events = json.loads(data)["traceEvents"]
    named = lambda kind: {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
                          for e in events if e.get("ph") == "M" and e.get("name") == kind}
    devices = {pid for (pid, _), name in named("process_name").items()
               if name.startswith("/device:")}
    # A device's kernels are on its "Stream #N" lines; the others ("XLA Ops", "Framework Name
    # Scope", ...) regroup the same time by op and scope.
    streams = {key for key, name in named("thread_name").items()
               if key[0] in devices and name.startswith("Stream #")}
    totals: dict[str, tuple[float, int]] = {}
    for event in events:
        if event.get("ph") == "X" and (not device_only
                                       or (event["pid"], event.get("tid")) in streams):
            total, count = totals.get(event["name"], (0.0, 0))
            totals[event["name"]] = (total + float(event.get("dur", 0.0)), count + 1)
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("capture_dir")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--expect", default="", help="comma list of names that must appear among the ops")
    p.add_argument("--device", action="store_true",
                   help="only the accelerators' events, each with its share of their total")
    args = p.parse_args(argv)
    totals = event_totals(args.capture_dir, device_only=args.device)
    if args.device and not totals:
        print(f"no device kernels in {args.capture_dir}: the capture has no accelerator timeline "
              "(a CPU run's work is on the host; drop --device to list its ops)")
    top = sorted(totals.items(), key=lambda item: -item[1][0])[: args.top]
    everything = sum(us for us, _ in totals.values()) or 1.0
    for name, (us, count) in top:
        share = f"  {us / everything:6.1%}" if args.device else ""
        print(f"{us:12.1f} us{share}  {count:6d}x  {name}")
    names = " ".join(totals)
    missing = [n for n in args.expect.split(",") if n and n not in names]
    if missing:
        print(f"missing from the trace: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
