"""Smoke tests of the benchmark scripts at tiny sizes (interpret mode on CPU)."""
from __future__ import annotations

import json

from bench import attention as attention_bench
from bench import tune
from kernels import tuning

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
                          "--warmup", "0", "--repeats", "1", "--calls", "1"])
    entry = json.loads(table.read_text())[tuning.device_kind()]["attention/triton"]["d64"]
    assert entry == recorded["attention", "d64"]
    first = {**tune.ATTENTION_CANDIDATES["d64"]["forward"][0],
             **tune.ATTENTION_CANDIDATES["d64"]["backward"][0]}
    assert first.items() <= entry.items()
