"""What ptxas reported for each Mosaic GPU kernel a command compiled, beside the command's output:

    python bench/ptxas.py -- python bench/attention.py --impl ours --seq 4096 --head-dim 64

runs the command with MOSAIC_GPU_DUMP_PTXAS=1 (Mosaic GPU then passes ptxas its verbose flag) and
replaces each kernel's report with one line: its registers, its spills, and ptxas's "Potential
Performance Loss" notes, such as wgmma instructions serialized for want of registers (C7512).
Exits 1 when any kernel has such a note (or with the command's own status when it fails). A
serialized wgmma shows in no spill count: session 33's half step on 256-key tiles had the
attention forward's wgmmas serialized with no spill and ran it 30% slower (bench/RESULTS.md).
On the device: `bash bench/gpu_suite.sh ptxas`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from typing import Iterable, Iterator

PERFORMANCE_NOTE = re.compile(
    r"\((C\d+)\) Potential Performance Loss: (.*) for the function '(\w+)'")
ENTRY = re.compile(r"Compiling entry function '(\w+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


@dataclasses.dataclass
class Kernel:
    """One kernel's compile, as ptxas reported it."""
    function: str = "?"
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)   # "C7512: wgmma... serialized"

    def summary(self) -> str:
        spills = (f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded"
                  if self.spill_stores or self.spill_loads else "no spill")
        notes = "".join(f"; PERFORMANCE LOSS {note}" for note in self.notes)
        return f"ptxas: {self.function}: {self.registers} registers, {spills}{notes}"


def is_report(line: str) -> bool:
    """A line of ptxas's verbose report (its function properties are indented, unprefixed);
    its errors pass through as they are."""
    return line.startswith(("ptxas info", "ptxas warning")) or "bytes stack frame" in line


def reports(lines: Iterable[str]) -> Iterator[str | Kernel]:
    """The lines, each kernel's report (from its first ptxas line to its "Compile time") replaced
    by the Kernel it describes; the blank line ptxas ends a report with is dropped."""
    kernel, after_report = None, False
    for line in lines:
        if is_report(line):
            kernel = kernel or Kernel()
            if note := PERFORMANCE_NOTE.search(line):
                kernel.function = note.group(3)
                kernel.notes.append(f"{note.group(1)}: {note.group(2)}")
            elif entry := ENTRY.search(line):
                kernel.function = entry.group(1)
            elif spills := SPILLS.search(line):
                kernel.spill_stores, kernel.spill_loads = map(int, spills.groups())
            elif registers := REGISTERS.search(line):
                kernel.registers = int(registers.group(1))
            if "Compile time" in line:
                yield kernel
                kernel, after_report = None, True
            continue
        if not (after_report and not line.strip()):
            yield line
        after_report = False
    if kernel is not None:   # a report cut short
        yield kernel


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise SystemExit("bench/ptxas.py: give the command after `--`")
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", PYTHONUNBUFFERED="1")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as process:
        kernels = []
        try:
            for item in reports(line.rstrip("\n") for line in process.stdout):
                if isinstance(item, Kernel):
                    kernels.append(item)
                    item = item.summary()
                print(item, flush=True)
        except KeyboardInterrupt:
            process.terminate()
            raise
    lost = [k for k in kernels if k.notes]
    print(f"\nptxas: {len(kernels)} kernel compiles, {len(lost)} with a performance-loss note"
          + ("" if kernels else " (none reported: no Mosaic GPU kernel compiled, or this jaxlib "
             "ignores MOSAIC_GPU_DUMP_PTXAS)"))
    if process.returncode:
        return process.returncode
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
