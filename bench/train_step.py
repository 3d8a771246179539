"""Training-step benchmark: ms/step, tokens/s and MFU of the real train step for each kernel path.

    python bench/train_step.py                               # micro_gpt_4, seq 1024, largest batch
    python bench/train_step.py --preset gpt2_small           # 12 blocks, d 768, vocab 50257
    python bench/train_step.py --kernels reference,pallas --batch 32 --json out.json
    python bench/train_step.py --kernels pallas --batch 64 --devices 1,2    # data-parallel scaling
    python bench/train_step.py --preset gpt2_small --devices 1,2,4,8 --shard replicate,fsdp

It times `microgpt.train.make_train_step` (forward, backward, clipping, AdamW) on random tokens.
MFU counts the model's FLOPs as the PaLM paper's appendix B does (`model.flops_per_token`: 6 N per
token for the matmul weights, including the tied logits, plus 12 L S d for attention) over the
device's datasheet dense bf16 peak (989 TF/s for an H100 or H200 SXM: the convention of the MFU
figures the field publishes), and, labelled, over its bf16 matmul peak measured here. The batch is the largest of --batches that fits for every path
(the reference, which materializes the [S, S] scores, fits the least), so all paths run one shape.
With --devices, each path also runs data-parallel over the first n devices for each n listed, at the
same global batch and data: the losses after the timed steps must agree, the speed-up is the scaling;
with --shard, each layout of the parameters and optimizer state (microgpt/sharding.py) at each
count, the bytes of that state a device holds beside it. Each row has the step's peak memory by XLA's
memory analysis (parameters, optimizer state, batch, activations and temporaries); a batch whose
peak exceeds what XLA may allocate on the device counts as not fitting without running.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from bench.common import (add_full_arg, device_description, format_table, int_list, maybe_profile,
                          peak_bytes, peak_tflops, smoke_size, write_json)
from microgpt import files, sharding
from microgpt.gpt import KERNELS, PRESETS
from microgpt.model import flops_per_token
from microgpt.train import TrainConfig, data_mesh, make_optimizer, make_train_step

DEFAULT_SEQ = 1024   # the sequence length of a preset without a context of its own


def step_ms(kernels: str, args, batch: int, devices: int, shard: str, warmup: int, repeats: int,
            steps: int) -> tuple[float, float, int, int]:
    """(median milliseconds per train step, the loss of the last step, the bytes of parameters
    and optimizer state a device holds, the step's peak bytes a device holds) over the first
    `devices` devices with the parameters held as `shard` says, state threaded through as in
    training (every run takes the same steps on the same data). The peak is XLA's memory analysis
    of the compiled step (common.peak_bytes); a step whose peak exceeds what XLA may allocate
    (device_memory_bytes) raises MemoryError before it runs."""
    model = PRESETS[args.preset](vocab=args.vocab, model_d=args.model_d, num_heads=args.heads,
                                 kernels=kernels)
    optimizer, _ = make_optimizer(TrainConfig(max_steps=10_000))
    mesh = data_mesh(jax.devices()[:devices])
    step = make_train_step(model, optimizer, mesh, shard)
    def init():
        params = model.get_params(0)
        return params, optimizer.init(params)
    # Each phase timed apart: on the H100 gpt2_small's init compiled for 96-108 s (its 777
    # kernels then; model.init_params now draws the blocks together: bench/RESULTS.md, session 23).
    start = time.perf_counter()
    compiled_init = jax.jit(init, out_shardings=sharding.shardings(
        jax.eval_shape(init), shard, mesh)).lower().compile()
    init_compiled = time.perf_counter()
    params, opt_state = jax.block_until_ready(compiled_init())
    held = sharding.bytes_per_device((params, opt_state))
    rng = np.random.default_rng(0)
    x, y = (jax.device_put(rng.integers(0, args.vocab, (batch, args.seq), dtype=np.int32))
            for _ in range(2))
    initialized = time.perf_counter()
    step = step.lower(params, opt_state, x, y).compile()
    if args.dump_hlo:   # the names a trace shows (fusion_375, ...) are this module's
        name = f"{kernels}-{devices}dev-{shard}-batch{batch}.hlo.txt"
        files.write_text(Path(args.dump_hlo) / name, step.as_text())
    peak, limit = peak_bytes(step), device_memory_bytes()
    print(f"  {kernels:9s} batch {batch}: init compiled in {init_compiled - start:.0f} s, run in "
          f"{initialized - init_compiled:.0f} s; step compiled in "
          f"{time.perf_counter() - initialized:.0f} s, peak {peak / 2**30:.2f} GiB", flush=True)
    if limit and peak > limit:
        raise MemoryError(f"the step needs {peak / 2**30:.1f} GiB by XLA's memory analysis; XLA "
                          f"may allocate {limit / 2**30:.1f} GiB of the device")
    for _ in range(warmup):
        params, opt_state, _ = step(params, opt_state, x, y)
    jax.block_until_ready(params)
    per_step = []
    # The trace holds the timed steps only (not compilation and autotuning).
    profile = args.profile and f"{args.profile}/{kernels}-{devices}dev-{shard}"
    with maybe_profile(profile):
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                params, opt_state, metrics = step(params, opt_state, x, y)
            jax.block_until_ready(metrics)
            per_step.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(per_step), float(metrics["loss"]), held, peak


def device_memory_bytes() -> int | None:
    """The memory XLA may allocate on the first device (its allocator's limit: by default 75% of
    the device's; None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def is_out_of_memory(err: Exception) -> bool:
    return (isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)
            or "out of memory" in str(err).lower())


def step_flops(args, batch: int) -> int:
    """The model FLOPs of one train step (`model.flops_per_token`) at the preset's depth and the
    shape of `args`."""
    return flops_per_token(PRESETS[args.preset].num_layers, args.model_d, args.seq,
                           args.vocab) * batch * args.seq


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """-> (parser, arguments). --model-d, --heads, --vocab and --seq not given are the preset's:
    its defaults (micro_gpt_4: d 512, 8 heads, vocabulary 9000) and its context (gpt2_small: d 768,
    12 heads, vocabulary 50257, seq 1024), seq 1024 for a preset without one."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="micro_gpt_4")
    p.add_argument("--model-d", type=int, help="model width (default: the preset's)")
    p.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's context, "
                                           f"else {DEFAULT_SEQ})")
    p.add_argument("--batch", type=int, help="one batch size (default: the largest of --batches that fits)")
    p.add_argument("--batches", default="128,64,32,16,8", help="candidates, largest first")
    p.add_argument("--kernels", default="reference,xla,pallas")
    p.add_argument("--devices", help="comma list of device counts (default: every local device)")
    p.add_argument("--shard", default="replicate",
                   help=f"comma list of parameter layouts, of {', '.join(sharding.SHARDINGS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--profile", help="capture a jax.profiler trace of each path's timed steps into "
                                     "a subfolder of this folder (PATH-NdEV)")
    p.add_argument("--dump-hlo", help="write each compiled step's optimized HLO into this folder "
                                      "(PATH-NdEV-SHARD-batchB.hlo.txt), to read a trace's op names")
    add_full_arg(p)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name, value in (("model_d", preset.model_d), ("heads", preset.num_heads),
                        ("vocab", preset.vocab), ("seq", preset.context or DEFAULT_SEQ)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return p, args


def main(argv=None) -> list[dict]:
    p, args = parse_args(argv)
    if smoke_size(args.full):   # width 128, 64 tokens a sequence, batch 8, 2 steps once
        args.model_d, args.seq = min(args.model_d, 128), min(args.seq, 64)
        args.batch = min(args.batch or 8, 8)
        args.warmup, args.repeats, args.steps = (min(n, 1) for n in (args.warmup, args.repeats,
                                                                     args.steps))
        if args.model_d % args.heads:
            args.heads = 2
    paths = args.kernels.split(",")
    unknown = sorted(set(paths) - set(KERNELS))
    if unknown:
        p.error(f"unknown --kernels {unknown}; choose from {KERNELS}")
    candidates = [args.batch] if args.batch else [int(b) for b in args.batches.split(",")]
    counts = int_list(args.devices) if args.devices else [jax.device_count()]
    if max(counts) > jax.device_count() or min(counts) < 1:
        p.error(f"--devices {counts}: this host has {jax.device_count()} devices")
    layouts = args.shard.split(",")
    if set(layouts) - set(sharding.SHARDINGS):
        p.error(f"unknown --shard {sorted(set(layouts) - set(sharding.SHARDINGS))}; choose from "
                f"{sharding.SHARDINGS}")
    runs = [(kernels, n, shard) for kernels in paths for n in counts for shard in layouts]

    timing = dict(warmup=args.warmup, repeats=args.repeats, steps=args.steps)
    results: dict[tuple[str, int, str], tuple[float, float, int, int]] = {}
    batch = None
    for b in candidates:   # the largest batch every path fits
        if any(b % n for n in counts):
            print(f"  batch {b} does not split over {counts} devices; skipped", flush=True)
            continue
        try:
            for kernels, n, shard in runs:
                results[kernels, n, shard] = step_ms(kernels, args, b, n, shard, **timing)
                print(f"  {kernels:9s} batch {b} on {n} device(s), {shard}: "
                      f"{results[kernels, n, shard][0]:.2f} ms/step", flush=True)
            batch = b
            break
        except Exception as err:  # noqa: BLE001 - only out-of-memory moves to a smaller batch
            if not is_out_of_memory(err):
                raise
            reason = str(err).strip().splitlines()[0][:200]
            print(f"  batch {b} does not fit ({kernels}: {reason}); trying a smaller one",
                  flush=True)
            results.clear()
    if batch is None:
        raise SystemExit("no candidate batch fits")

    peak, datasheet = peak_tflops(), peak_tflops(datasheet=True)
    flops_step = step_flops(args, batch)
    ms_of = lambda path, devices, shard: results.get((path, devices, shard), (np.nan,))[0]
    records = []
    for (kernels, n, shard), (ms, loss, held, peak_memory) in results.items():
        tflops = flops_step / (ms * 1e-3) / 1e12
        # On one device the layouts hold the same: either one's time is the one device's.
        one = ms_of(kernels, 1, "replicate" if (kernels, 1, "replicate") in results else shard)
        records.append(dict(kernels=kernels, devices=n, shard=shard, state_gb_per_device=held / 1e9,
                            peak_gib_per_device=peak_memory / 2**30,
                            preset=args.preset, model_d=args.model_d,
                            heads=args.heads, vocab=args.vocab, seq=args.seq, batch=batch,
                            ms_per_step=ms, tokens_per_s=batch * args.seq / (ms * 1e-3),
                            model_tflops=tflops,
                            mfu=tflops / (datasheet * n) if datasheet else None,
                            mfu_measured_peak=tflops / (peak * n) if peak else None,
                            x_reference=ms_of("reference", n, shard) / ms,
                            x_xla=ms_of("xla", n, shard) / ms,
                            x_replicate=ms_of(kernels, n, "replicate") / ms,
                            x_one_device=one / ms,
                            loss=loss))
    print(f"train step, {args.preset} d={args.model_d} heads={args.heads} vocab={args.vocab} "
          f"seq={args.seq} batch={batch} on {device_description()}")
    print(format_table(records, [("kernels", "kernels", "s"), ("devices", "devices", "d"),
                                 ("shard", "shard", "s"),
                                 ("state_gb_per_device", "state GB/device", ".3f"),
                                 ("peak_gib_per_device", "peak GiB/device", ".2f"),
                                 ("ms_per_step", "ms/step", ".2f"),
                                 ("tokens_per_s", "tokens/s", ",.0f"),
                                 ("model_tflops", "model TF/s", ".1f"),
                                 ("mfu", "MFU (datasheet)", ".1%"),
                                 ("mfu_measured_peak", "MFU (measured peak)", ".1%"),
                                 ("x_reference", "x reference", ".2f"), ("x_xla", "x xla", ".2f"),
                                 ("x_replicate", "x replicate", ".2f"),
                                 ("x_one_device", "x 1 device", ".2f"), ("loss", "last loss", ".6f")]))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
