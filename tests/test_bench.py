"""Smoke tests of the benchmark scripts at tiny sizes (interpret mode on CPU)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import pytest

from bench import ab
from bench import attention as attention_bench
from bench import attention_bounds
from bench import ptxas
from bench import train_step as train_step_bench
from bench import tune
from kernels import config, tuning

RECORD_KEYS = {"impl", "batch", "seq", "heads", "head_dim", "causal", "fwd_ms", "fwd_bwd_ms",
               "fwd_tflops", "fwd_bwd_tflops"}


def test_attention_bench_writes_records(tmp_path, capsys):
    path = tmp_path / "attention.json"
    records = attention_bench.main(["--seq", "48", "--batch", "1", "--heads", "2", "--head-dim", "64",
                                    "--impl", "reference,triton", "--json", str(path),
                                    "--block-q", "16", "--block-k", "16"])
    written = json.loads(path.read_text())
    assert written["records"] == records
    assert "bench/attention.py" in written["meta"]["command"]
    assert [r["impl"] for r in records] == ["reference", "triton"]
    for record in records:
        assert RECORD_KEYS <= record.keys(), record
        assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0
        assert (record["batch"], record["seq"], record["heads"], record["head_dim"]) == (1, 48, 2, 64)
    assert "fwd+bwd TF/s" in capsys.readouterr().out


def test_attention_bench_masks_count_the_visible_pairs():
    """--kv-heads, --segments, --window reach every row; FLOPs are the visible pairs' (a window of
    7 at seq 64: 4 D H per pair, pairs = 64 + 63 + ... as the window allows), and PyTorch's rows,
    which run dense attention only, say so."""
    records = attention_bench.main(["--seq", "64", "--batch", "1", "--heads", "2", "--head-dim",
                                    "64", "--kv-heads", "1", "--window", "7", "--impl",
                                    "reference,triton,torch_cudnn", "--block-q", "16",
                                    "--block-k", "16"])
    by_impl = {r["impl"]: r for r in records}
    pairs = sum(min(i, 7) + 1 for i in range(64))
    for impl in ("reference", "triton"):
        row = by_impl[impl]
        assert (row["kv_heads"], row["window"]) == (1, 7) and "error" not in row
        flops = 4 * 2 * 64 * pairs
        assert row["fwd_tflops"] == pytest.approx(flops / row["fwd_ms"] / 1e9, rel=1e-9)
    assert "error" in by_impl["torch_cudnn"]


def test_attention_bench_reports_failures_and_goes_on(tmp_path):
    """An implementation that cannot run here is an error row, not the end of the sweep."""
    records = attention_bench.main(["--seq", "32", "--batch", "1", "--heads", "1", "--head-dim", "64",
                                    "--impl", "cudnn,reference", "--no-causal"])
    by_impl = {r["impl"]: r for r in records}
    if "error" in by_impl["cudnn"]:  # no cuDNN on this machine
        assert "fwd_ms" not in by_impl["cudnn"]
    assert "error" not in by_impl["reference"] and by_impl["reference"]["causal"] is False


def test_attention_bench_default_shapes_keep_tokens_and_width():
    args = attention_bench.parse_args([])
    assert args.seq == [512, 1024, 2048, 4096, 8192] and args.head_dim == [64, 128]
    assert args.causal and args.dtype == "bfloat16"


def test_tune_records_the_best_candidate(tmp_path):
    table = tmp_path / "tuning.json"
    recorded = tune.main(["--op", "attention", "--shape-keys", "d64", "--seq", "32", "--batch", "1",
                          "--max-candidates", "1", "--table", str(table),
                          "--warmup", "0", "--repeats", "1", "--calls", "1", "--full"])
    entry = json.loads(table.read_text())[tuning.device_kind()]["attention/triton"]["d64"]
    assert entry == recorded["attention/triton", "d64"]
    first = {**tune.ATTENTION_CANDIDATES["d64"]["forward"][0],
             **tune.ATTENTION_CANDIDATES["d64"]["backward"][0]}
    assert first.items() <= entry.items()


def test_tune_times_packed_documents_at_their_keys(monkeypatch):
    """The "_docs" keys are timed with segment ids: documents of their mean length, --batch and
    --seq applied."""
    args = tune.parse_args(["--seq", "32", "--batch", "1"])
    shape = tune._shape(tune.OPS["attention/mosaic_gpu"], "d128_s8192_docs", args)
    assert shape == tune.AttentionShape(1, 32, 16, 128, documents=512)
    masks, timed_calls = [], attention_bench.timed_calls
    monkeypatch.setattr(attention_bench, "timed_calls", lambda fn, shape, dtype, mask: (
        masks.append(mask) or timed_calls(fn, shape, dtype, mask)))
    ms = tune._time_attention(1, "triton")(tune.AttentionShape(1, 32, 2, 64, documents=8), {},
                                           dict(warmup=0, repeats=1, calls=1))
    assert ms > 0 and masks == [attention_bench.Masks(segments=8)]


def test_records_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """bench's JSON (and the tuning table, the curves) go to a temporary file renamed into place:
    a write cut short leaves the previous file as it was and no temporary behind."""
    from bench import common
    path = tmp_path / "out.json"
    common.write_json(path, [{"impl": "xla"}], command="first")
    before = path.read_text()

    def interrupted(self, text):
        self.write_bytes(text[:10].encode())   # half the file, then the interruption
        raise KeyboardInterrupt
    monkeypatch.setattr(type(path), "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.write_json(path, [{"impl": "mosaic_gpu"}], command="second")
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_train_step_scaling_runs_the_same_steps_on_each_device_count():
    """--devices 1,2 --shard replicate,fsdp: the same global batch over 1 and 2 devices, the
    parameters replicated or split, gives the same loss; fsdp holds half the state a device."""
    records = train_step_bench.main(["--kernels", "reference", "--batch", "4", "--seq", "16",
                                     "--model-d", "64", "--heads", "2", "--vocab", "64",
                                     "--devices", "1,2", "--shard", "replicate,fsdp",
                                     "--warmup", "1", "--repeats", "1", "--steps", "1"])
    assert [(r["kernels"], r["devices"], r["shard"]) for r in records] == [
        ("reference", 1, "replicate"), ("reference", 1, "fsdp"), ("reference", 2, "replicate"),
        ("reference", 2, "fsdp")]
    losses = [r["loss"] for r in records]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert records[0]["x_one_device"] == 1.0
    state = {(r["devices"], r["shard"]): r["state_gb_per_device"] for r in records}
    assert state[1, "fsdp"] == state[1, "replicate"] == state[2, "replicate"]
    assert state[2, "fsdp"] == pytest.approx(state[2, "replicate"] / 2, rel=0.01)


def test_train_step_refuses_a_batch_beyond_the_device_memory(monkeypatch, capsys):
    """A batch whose compiled step needs more than XLA may allocate (by its memory analysis) is
    refused before it runs, and the next candidate is measured, its peak memory in the row."""
    argv = ["--kernels", "xla", "--seq", "16", "--model-d", "64", "--heads", "2", "--vocab", "64",
            "--devices", "1", "--warmup", "1", "--repeats", "1", "--steps", "1", "--full"]
    small, = train_step_bench.main(argv + ["--batch", "2"])
    limit = int(small["peak_gib_per_device"] * 2**30) + 1024
    monkeypatch.setattr(train_step_bench, "device_memory_bytes", lambda: limit)
    record, = train_step_bench.main(argv + ["--batches", "64,2"])
    assert record["batch"] == 2 and record["peak_gib_per_device"] == small["peak_gib_per_device"]
    assert "batch 64 does not fit (xla: the step needs" in capsys.readouterr().out


def test_train_step_dumps_the_compiled_step_and_states_mfu_on_both_peaks(tmp_path, monkeypatch):
    """--dump-hlo writes the optimized HLO of each path's compiled step, the module whose op names
    a trace of it shows; MFU is the model's TF/s over the datasheet's peak and, apart, over the
    measured one (device peaks faked: this CPU has neither)."""
    monkeypatch.setattr(train_step_bench, "peak_tflops",
                        lambda datasheet=False: 1e-3 if datasheet else 5e-4)
    record, = train_step_bench.main([
        "--kernels", "xla", "--seq", "16", "--model-d", "64", "--heads", "2", "--vocab", "64",
        "--batch", "2", "--devices", "1", "--warmup", "0", "--repeats", "1", "--steps", "1",
        "--full", "--dump-hlo", str(tmp_path)])
    text = (tmp_path / "xla-1dev-replicate-batch2.hlo.txt").read_text()
    assert text.startswith("HloModule jit_step") and "ENTRY" in text and "fusion" in text
    assert record["mfu"] == pytest.approx(record["model_tflops"] / 1e-3)
    assert record["mfu_measured_peak"] == pytest.approx(record["model_tflops"] / 5e-4)


def test_train_step_takes_the_preset_shape_and_depth():
    """--preset gpt2_small measures at its own d 768, 12 heads, vocabulary 50257, seq 1024 unless
    a flag says otherwise, and counts the FLOPs of its 12 blocks."""
    from microgpt.model import flops_per_token
    _, args = train_step_bench.parse_args(["--preset", "gpt2_small"])
    assert (args.model_d, args.heads, args.vocab, args.seq) == (768, 12, 50257, 1024)
    assert train_step_bench.step_flops(args, 2) == flops_per_token(12, 768, 1024, 50257) * 2 * 1024
    _, args = train_step_bench.parse_args(["--preset", "gpt2_small", "--seq", "64", "--heads", "6"])
    assert (args.model_d, args.heads, args.vocab, args.seq) == (768, 6, 50257, 64)
    _, args = train_step_bench.parse_args([])
    assert (args.preset, args.model_d, args.heads, args.vocab, args.seq) == ("micro_gpt_4", 512, 8,
                                                                            9000, 1024)


@dataclasses.dataclass(frozen=True)
class _Toy(config.KernelConfig):
    tile: int = config.count(minimum=0)


@dataclasses.dataclass(frozen=True)
class _ToyKernels(config.Kernels):
    forward: _Toy


def test_tune_prefers_the_implementation_measured_fastest(tmp_path, monkeypatch):
    """Of the implementations with a tuned entry, the fastest forward+backward is recorded as the
    op's preferred one (the default attention follows it on Hopper)."""
    timed = {}

    def op(ms):
        def total(shape, config, timing):
            timed[config["tile"]] = shape
            return ms
        return tune.Op(shapes={"d64": (2, 8, 64)}, defaults=lambda key: _ToyKernels(_Toy(0)),
                       stages=[], total=total)

    monkeypatch.setattr(tune, "OPS", {"toy/slow": op(2.0), "toy/fast": op(1.0),
                                      "toy/untuned": op(0.5)})
    table = tmp_path / "tuning.json"
    device = tuning.device_kind()
    tuning.record(device, "toy", "slow", "d64", {"tile": 16}, table)
    tuning.record(device, "toy", "fast", "d64", {"tile": 32}, table)
    args = tune.parse_args(["--table", str(table), "--tokens", "4"])
    assert tune.prefer("toy", "d64", args, timing={}) == "toy/fast"
    assert json.loads(table.read_text())[device]["toy"] == {"d64": "fast"}
    assert timed == {16: (4, 8, 64), 32: (4, 8, 64)}   # the tuned configs, at the tuning shape


def test_tune_skips_a_stage_with_no_candidates_at_the_key():
    """A stage whose candidates do not apply at a key (none) leaves the earlier stages' winner;
    one whose candidates all fail records nothing."""
    timed = []

    def time(shape, config, timing):
        timed.append(config["tile"])
        return float(config["tile"])
    stages = [tune.Stage("tiles", lambda key: [{"tile": 3}, {"tile": 2}], time),
              tune.Stage("only_d128", lambda key: [{"tile": 1}] if key == "d128" else [], time)]
    op = tune.Op(shapes={"d64": (1,)}, defaults=lambda key: _ToyKernels(_Toy(0)), stages=stages,
                 total=time)
    assert tune.sweep("toy/impl", op, "d64", (1,), {}, None) == {"tile": 2}
    assert timed == [3, 2]
    assert tune.sweep("toy/impl", op, "d128", (1,), {}, None) == {"tile": 1}
    failing = tune.Stage("fails", lambda key: [{"tile": 5}], lambda *_: 1 / 0)
    assert tune.sweep("toy/impl", op._replace(stages=[failing]), "d64", (1,), {}, None) is None


def test_block_config_layers_narrower_shape_keys(monkeypatch):
    """"d128_s8192" layers over "d128", which layers over "*" and the defaults; overrides win."""
    table = {tuning.device_kind(): {"toy/impl": {
        "*": {"a": 1}, "d128": {"b": 2, "c": 2}, "d128_s8192": {"c": 3}}}}
    monkeypatch.setattr(tuning, "_tables", lambda: (("shipped", table),))
    defaults = {"a": 0, "b": 0, "c": 0, "d": 0}
    assert tuning.block_config("toy", "impl", "d128_s8192", defaults) == {"a": 1, "b": 2, "c": 3,
                                                                         "d": 0}
    assert tuning.block_config("toy", "impl", "d128_s4096", defaults)["c"] == 2
    assert tuning.block_config("toy", "impl", "d64_s8192", defaults) == {**defaults, "a": 1}
    assert tuning.block_config("toy", "impl", "d128_s8192", defaults, {"c": 9})["c"] == 9


def test_tune_compares_implementations_at_narrower_keys(tmp_path, monkeypatch):
    """--compare-only at "d64_s1024": the implementation tuned only at "d64" competes with its
    "d64" configuration, at the shape of the implementation that has the narrow key."""
    timed = {}

    def op(ms, shapes):
        def total(shape, config, timing):
            timed[config["tile"]] = shape
            return ms
        return tune.Op(shapes=shapes, defaults=lambda key: _ToyKernels(_Toy(0)), stages=[],
                       total=total)

    monkeypatch.setattr(tune, "OPS", {
        "toy/wide": op(1.0, {"d64": (2, 8, 64)}),
        "toy/narrow": op(2.0, {"d64": (2, 8, 64), "d64_s1024": (4, 1024, 64)})})
    table = tmp_path / "tuning.json"
    device = tuning.device_kind()
    tuning.record(device, "toy", "wide", "d64", {"tile": 16}, table)
    tuning.record(device, "toy", "narrow", "d64", {"tile": 8}, table)
    tuning.record(device, "toy", "narrow", "d64_s1024", {"tile": 32}, table)
    tune.main(["--op", "toy", "--compare-only", "--shape-keys", "d64_s1024", "--table", str(table),
               "--full"])
    assert json.loads(table.read_text())[device]["toy"] == {"d64_s1024": "wide"}
    assert timed == {16: (4, 1024, 64), 32: (4, 1024, 64)}
    monkeypatch.setattr(tuning, "_tables", lambda: (("test", json.loads(table.read_text())),))
    assert tuning.preferred_implementation("toy", "d64_s1024") == "wide"
    assert tuning.preferred_implementation("toy", "d64_s2048") is None


def test_attention_bench_on_cpu_runs_a_smoke_size_unless_asked(capsys):
    """`python bench/attention.py --seq 1024` as the README has it: on CPU the kernels are
    interpreted, so it says so and times a smoke size (--full would take the shapes as given)."""
    records = attention_bench.main(["--seq", "1024", "--head-dim", "64", "--impl", "triton"])
    assert [(r["batch"], r["seq"], r["heads"]) for r in records] == [(1, 128, 2)]
    assert "interpret mode" in capsys.readouterr().out


def test_tune_on_cpu_runs_a_smoke_test_into_a_scratch_table(tmp_path, capsys):
    """`python bench/tune.py` as the README has it, on CPU: one small key per op, recorded into a
    scratch copy of the table, never into the table it was given."""
    table = tmp_path / "tuning.json"
    recorded = tune.main(["--table", str(table)])
    assert {name for name, _ in recorded} == {"attention/triton", "layernorm_ffn/triton"}
    assert not table.exists() and "recording into" in capsys.readouterr().out


def test_exp2_on_fma_matches_exp2_below_bf16_rounding():
    """attention_bounds' software exponential: within 1e-4 relative of exp2 over the softmax's
    range (bf16 rounds p to 2^-9), and masked scores (-inf) weigh about 2^-125, not NaN."""
    x = jnp.concatenate([jnp.linspace(-125.0, 0.0, 100_001, dtype=jnp.float32),
                         jnp.array([-0.0, -jnp.inf], jnp.float32)])
    got, want = attention_bounds.exp2_on_fma(x), jnp.exp2(x)
    assert float(jnp.max(jnp.abs(got[:-1] / want[:-1] - 1))) < 1e-4
    assert 0 < float(got[-1]) < 2.0**-124


def test_attention_bounds_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        attention_bounds.main(["--seq", "128"])


AB_PATCH = "--- a/value.txt\n+++ b/value.txt\n@@ -1 +1 @@\n-1\n+2\n"
# A benchmark that times the tree: its one row's fwd_ms is value.txt's number (2 with the change,
# 1 without); it fails where FAIL_AT names that number.
AB_BENCHMARK = """
import json, os, sys
value = float(open("value.txt").read())
if os.environ.get("FAIL_AT") == str(int(value)):
    sys.exit("failed")
records = [{"impl": "x", "seq": 8, "fwd_ms": value}, {"impl": "y", "error": "not installed"}]
open(sys.argv[sys.argv.index("--json") + 1], "w").write(json.dumps({"records": records}))
"""


def _ab_tree(tmp_path, monkeypatch):
    (tmp_path / "value.txt").write_text("2\n")
    (tmp_path / "change.patch").write_text(AB_PATCH)
    (tmp_path / "bench.py").write_text(AB_BENCHMARK)
    monkeypatch.chdir(tmp_path)
    return ["--patch", "change.patch", "--", sys.executable, "bench.py"]


def test_ab_alternates_the_change_and_puts_it_back(tmp_path, monkeypatch):
    args = _ab_tree(tmp_path, monkeypatch)
    rows = ab.main(["--runs", "2", "--json", "ab.json", *args])
    assert rows == [dict(impl="x", seq=8, field="fwd_ms", with_ms=[2.0, 2.0],
                         without_ms=[1.0, 1.0], best_with=2.0, best_without=1.0, speedup=0.5)]
    assert (tmp_path / "value.txt").read_text() == "2\n"
    assert json.loads((tmp_path / "ab.json").read_text())["records"] == rows


def test_ab_puts_the_change_back_when_a_run_fails(tmp_path, monkeypatch):
    args = _ab_tree(tmp_path, monkeypatch)
    monkeypatch.setenv("FAIL_AT", "1")
    with pytest.raises(subprocess.CalledProcessError):
        ab.main(["--runs", "1", *args])
    assert (tmp_path / "value.txt").read_text() == "2\n"


def test_ab_refuses_a_change_not_in_the_tree(tmp_path, monkeypatch):
    args = _ab_tree(tmp_path, monkeypatch)
    (tmp_path / "value.txt").write_text("1\n")
    with pytest.raises(SystemExit, match="is not applied in this tree"):
        ab.main(args)
    with pytest.raises(SystemExit, match="after `--`"):
        ab.main(["--patch", "change.patch"])


# ptxas's verbose report of two kernels (from session 33's H100 log), then a benchmark row.
PTXAS_LOG = """\
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'flash_attention_fwd_mgpu_mosaic_gpu_kernel'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_attention_fwd_mgpu_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for flash_attention_fwd_mgpu_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem
ptxas info    : Compile time = 521.728 ms

ptxas warning : Registers are spilled to local memory in function 'flash_attention_dkdv_mgpu_mosaic_gpu_kernel', 136 bytes spill stores, 136 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_attention_dkdv_mgpu_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for flash_attention_dkdv_mgpu_mosaic_gpu_kernel
    136 bytes stack frame, 136 bytes spill stores, 136 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 136 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 402.116 ms

  ours       B4 S4096 H32 D64: 0.835 ms fwd, 2.823 ms fwd+bwd
"""


def test_ptxas_reports_one_line_a_kernel_and_its_performance_notes():
    fatal = "ptxas fatal   : Unresolved extern function 'f'"
    forward, dkdv, row, error = ptxas.reports([*PTXAS_LOG.splitlines(), fatal])
    assert error == fatal   # its errors pass through
    assert forward == ptxas.Kernel(
        "flash_attention_fwd_mgpu_mosaic_gpu_kernel", 168, 0, 0,
        ["C7512: wgmma.mma_async instructions are serialized due to insufficient register "
         "resources"])
    assert dkdv == ptxas.Kernel("flash_attention_dkdv_mgpu_mosaic_gpu_kernel", 168, 136, 136, [])
    assert row.startswith("  ours       B4 S4096")
    assert "no spill; PERFORMANCE LOSS C7512" in forward.summary()
    assert "spills 136 B stored / 136 B loaded" in dkdv.summary()


@pytest.mark.parametrize("log, exit_code, status", [
    (PTXAS_LOG, 0, 1), (PTXAS_LOG.split("\n", 1)[1], 0, 0),   # (the second without its C7512)
    ("", 3, 3)], ids=["serialized", "clean", "command_fails"])
def test_ptxas_exits_non_zero_on_a_performance_note_or_a_failed_command(tmp_path, capsys, log,
                                                                         exit_code, status):
    (tmp_path / "log.txt").write_text(log)
    command = (f"import os, sys; assert os.environ['MOSAIC_GPU_DUMP_PTXAS'] == '1'; "
               f"print(open({str(tmp_path / 'log.txt')!r}).read(), end=''); sys.exit({exit_code})")
    assert ptxas.main(["--", sys.executable, "-c", command]) == status
    out = capsys.readouterr().out
    assert "ptxas info" not in out
    if log:
        assert "  ours       B4 S4096" in out and "2 kernel compiles" in out
    with pytest.raises(SystemExit, match="after `--`"):
        ptxas.main([])
