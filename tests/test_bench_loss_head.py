"""Smoke test of bench/loss_head.py at a tiny size on CPU."""
from __future__ import annotations

import json

from bench import loss_head


def test_loss_head_bench_writes_records(tmp_path):
    path = tmp_path / "loss_head.json"
    records = loss_head.main(["--tokens", "128", "--vocab", "300", "--d", "64", "--impl", "xla",
                              "--json", str(path)])
    assert json.loads(path.read_text())["records"] == records
    (record,) = records
    assert (record["tokens"], record["vocab"], record["d"]) == (128, 300, 64)
    assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0 and record["fwd_vs_xla"] == 1.0


def test_loss_head_bench_takes_our_chunk_budget():
    """--chunk-mib reaches our heads as their block_sizes; without it, the tuning table decides."""
    assert loss_head.implementation("mosaic_gpu", 128).keywords["block_sizes"] == {
        "probabilities_chunk_mib": 128}
    assert loss_head.implementation("triton").keywords["block_sizes"] is None
    records = loss_head.main(["--tokens", "128", "--vocab", "300", "--d", "64", "--impl",
                              "triton", "--chunk-mib", "1"])
    assert records[0]["fwd_bwd_ms"] > 0
