"""Smoke test of bench/ln_ffn.py at a tiny size (interpret mode on CPU)."""
from __future__ import annotations

import json

import pytest

from bench import ln_ffn

RECORD_KEYS = {"impl", "tokens", "d", "residual", "dtype", "fwd_ms", "fwd_bwd_ms", "fwd_tflops",
               "fwd_bwd_tflops", "fwd_vs_xla", "fwd_bwd_vs_xla"}


def test_ln_ffn_bench_writes_records(tmp_path, capsys):
    path = tmp_path / "ln_ffn.json"
    records = ln_ffn.main(["--tokens", "64", "--d", "128", "--impl", "reference,xla,triton",
                           "--json", str(path)])
    written = json.loads(path.read_text())
    assert written["records"] == records
    assert "bench/ln_ffn.py" in written["meta"]["command"]
    assert [r["impl"] for r in records] == ["xla", "triton"]  # "reference" is xla, timed once
    for record in records:
        assert RECORD_KEYS <= record.keys(), record
        assert (record["tokens"], record["d"], record["residual"]) == (64, 128, True)
        assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0
    assert records[0]["fwd_vs_xla"] == 1.0
    assert "fwd+bwd TF/s" in capsys.readouterr().out


def test_ln_ffn_bench_shapes():
    assert ln_ffn.shapes_of(None, None) == [(131072, 512), (65536, 768), (32768, 1024)]
    assert ln_ffn.shapes_of([4096], [512, 768]) == [(4096, 512), (4096, 768)]
    assert ln_ffn.shapes_of(None, [512]) == [(131072, 512), (65536, 512), (32768, 512)]
    with pytest.raises(SystemExit, match="equal lengths"):
        ln_ffn.shapes_of([1, 2], [128, 256, 384])


def test_ln_ffn_bench_reports_failures_and_goes_on():
    """A kernel that cannot run (here: a bad block size) is an error row, not the end."""
    records = ln_ffn.main(["--tokens", "32", "--d", "128", "--impl", "triton,xla", "--no-residual",
                           "--block-sizes", '{"up_block_n": 96}'])
    by_impl = {r["impl"]: r for r in records}
    assert "up_block_n=96" in by_impl["triton"]["error"]
    assert "error" not in by_impl["xla"] and by_impl["xla"]["residual"] is False
