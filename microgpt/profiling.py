"""Profiling: what a jax.profiler capture records, and the capture of a span of training steps
(`python -m microgpt.train --profile DIR`; the benchmarks' --profile uses the same options)."""
from __future__ import annotations

import jax
from tqdm import tqdm


def profiler_options() -> jax.profiler.ProfileOptions:
    """What a capture records: device activity and the runtime's host events, without the Python
    tracer, whose every-function-call events made a 3-step GPU capture of micro_gpt_4 103 MB
    gzipped, too large for the trace viewer's converter (it died converting it)."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


class StepProfiler:
    """A jax.profiler trace of the steps first <= step < last, written to `directory`."""

    def __init__(self, directory: str | None, steps: tuple[int, int]):
        self.directory, (self.first, self.last) = directory, steps
        self.active = False

    def before_step(self, step: int) -> None:
        if self.directory and step == self.first:
            jax.profiler.start_trace(self.directory, profiler_options=profiler_options())
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step + 1 >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)   # the traced steps' device work belongs in the trace
            jax.profiler.stop_trace()
            self.active = False
            tqdm.write(f"profile of steps {self.first}:{self.last} written to {self.directory} "
                       f"(tensorboard --logdir {self.directory})")
