"""A change timed against the tree without it, in alternated runs:

    git diff BASE > change.patch      # the change, applied in the tree
    python bench/ab.py --patch change.patch --runs 3 -- python bench/attention.py --impl ours --seq 512

Each round runs the benchmark command with the change, then with it reversed (`patch -R`), and
puts it back, also when interrupted. Each run writes the benchmark's JSON (`--json` is appended to
the command); the table gives, for every row and every timing (the records' `*_ms` fields), the
best of each variant's runs and their ratio. Best of runs, alternated: on a lent GPU one
process's timings have differed from the next one's by up to half (bench/RESULTS.md, session 31),
so one run of each compares poorly. On the device: `AB_PATCH=... bash bench/gpu_suite.sh ab`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microgpt import files  # noqa: E402 - after the path

VARIANTS = ("with", "without")


def record_key(record: dict) -> tuple:
    """What names a row: its fields that are neither timings nor derived figures (floats, and
    which peer a ratio was taken against, which may differ from run to run), nor nested (the
    tuning entries)."""
    return tuple((k, v) for k, v in record.items()
                 if (isinstance(v, (str, int, bool)) or v is None)
                 and not k.endswith("_cudnn_impl"))


def timings(runs: list[list[dict]]) -> dict[tuple, dict[str, list[float]]]:
    """Each row's `*_ms` figures over the runs: {row key: {field: [ms per run]}}; rows that
    failed (an `error` field) have none."""
    table: dict[tuple, dict[str, list[float]]] = {}
    for records in runs:
        for record in records:
            fields = table.setdefault(record_key(record), {})
            for field, value in record.items():
                if field.endswith("_ms") and isinstance(value, (int, float)):
                    fields.setdefault(field, []).append(float(value))
    return table


def compare(with_runs: list[list[dict]], without_runs: list[list[dict]]) -> list[dict]:
    """Per row and timing: every run's ms of both variants, the best of each, and best without /
    best with (above 1: the change is faster)."""
    with_table, without_table = timings(with_runs), timings(without_runs)
    rows = []
    for key, fields in with_table.items():
        for field, values in fields.items():
            others = without_table.get(key, {}).get(field)
            if not others:
                continue
            rows.append(dict(key, field=field, with_ms=values, without_ms=others,
                             best_with=min(values), best_without=min(others),
                             speedup=min(others) / min(values)))
    return rows


def label(row: dict) -> str:
    """A row's name: its key's fields but the constant ones a reader can take as read."""
    skip = {"field", "with_ms", "without_ms", "best_with", "best_without", "speedup", "dtype"}
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)


def patch(path: Path, reverse: bool, dry_run: bool = False) -> subprocess.CompletedProcess:
    args = ["patch", "-s", "-p1", "-f", "-i", str(path)] + ["-R"] * reverse
    return subprocess.run(args + ["--dry-run"] * dry_run, capture_output=True, text=True)


def run_benchmark(command: list[str], json_path: Path) -> list[dict]:
    subprocess.run(command + ["--json", str(json_path)], check=True)
    return json.loads(json_path.read_text())["records"]


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, required=True,
                        help="the change as a diff (git diff), applied in the tree")
    parser.add_argument("--runs", type=int, default=3, help="rounds of with / without")
    parser.add_argument("--json", help="write the comparison's rows to this path")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise SystemExit("bench/ab.py: give the benchmark command after `--`")
    if args.runs < 1:
        raise SystemExit(f"bench/ab.py: --runs must be at least 1; got {args.runs}")
    if not args.patch.is_file():
        raise SystemExit(f"bench/ab.py: no patch file {args.patch}")
    if patch(args.patch, reverse=True, dry_run=True).returncode != 0:
        raise SystemExit(f"bench/ab.py: {args.patch} is not applied in this tree (`patch -R "
                         f"--dry-run` fails): apply the change first")

    runs: dict[str, list[list[dict]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.runs):
            for variant in VARIANTS:
                print(f"=== round {round_ + 1}/{args.runs}, {variant} the change: "
                      f"{shlex.join(command)}", flush=True)
                json_path = Path(scratch) / f"{variant}_{round_}.json"
                if variant == "without":
                    if patch(args.patch, reverse=True).returncode != 0:
                        raise SystemExit(f"bench/ab.py: `patch -R` of {args.patch} failed")
                    try:
                        runs[variant].append(run_benchmark(command, json_path))
                    finally:   # the tree goes back to the change, whatever happened
                        if patch(args.patch, reverse=False).returncode != 0:
                            raise SystemExit(f"bench/ab.py: re-applying {args.patch} failed: "
                                             f"the tree is without the change")
                else:
                    runs[variant].append(run_benchmark(command, json_path))

    rows = compare(runs["with"], runs["without"])
    print(f"\nbest of {args.runs} runs each (ms); x = without / with (above 1: the change is "
          f"faster)")
    for row in rows:
        values = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
        print(f"  {label(row)} {row['field']}: with {row['best_with']:.3f} ({values(row['with_ms'])})"
              f", without {row['best_without']:.3f} ({values(row['without_ms'])}): "
              f"{row['speedup']:.3f}x")
    if args.json:   # (no JAX here: the runs own the GPU)
        meta = {"command": shlex.join(["python", "bench/ab.py", *argv]),
                "date": datetime.date.today().isoformat()}
        files.write_text(args.json, json.dumps({"meta": meta, "records": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
