"""One-off (session 16): the loss head's Mosaic GPU GEMM with different epilogues, to split the
kernel's time into matmul, exponentials and stores. Removed after the measurement."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
from bench.common import time_ms
from kernels import mosaic_gpu_gemm
from kernels.logits_loss import common

def row_sum(s, bias):
    return (s + bias).sum(axis=1), (s + bias).max(axis=1)

def store_only(s, columns):
    return (s.astype(jnp.bfloat16),)

def exp_store(s, columns, log_z):
    return (jnp.exp2(s * common.LOG2E - log_z * common.LOG2E).astype(jnp.bfloat16),)

EPILOGUES = {
    "rowsum (no exp)": (row_sum, 1, 0, "stats"),
    "statistics": (common.tile_statistics, 1, 0, "stats"),
    "store": (store_only, 1, 0, "tile"),
    "exp+store": (exp_store, 1, 1, "tile"),
    "dlogits": (lambda s, *o: (common.tile_dlogits(s, *o),), 1, 3, "tile"),
}

VARIANTS = {
    "shipped": lambda: None,
    "one-wgmma-at-a-time": lambda: setattr(mosaic_gpu_gemm._Stream, "pipelined_product",
                                           lambda self, i, wg: self.product(i, wg)[0]),
    "row-major": lambda: setattr(mosaic_gpu_gemm, "GROUP_BYTES", 0),
}
ORIGINAL = mosaic_gpu_gemm._Stream.pipelined_product

def variant(name):
    mosaic_gpu_gemm._Stream.pipelined_product = ORIGINAL
    mosaic_gpu_gemm.GROUP_BYTES = 16 << 20
    VARIANTS[name]()

for m, v, d in [(8192, 9216, 512), (2048, 50432, 768), (65536, 50432, 768)]:
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    h = jax.random.normal(k[0], (m, d), jnp.bfloat16)
    e = (0.02 * jax.random.normal(k[1], (v, d))).astype(jnp.bfloat16)
    vec = jnp.zeros((v,), jnp.float32)
    rows = [jnp.full((m,), 10.0), jnp.zeros((m,)), jnp.full((m,), 1e-5)]
    flops = 2 * m * v * d
    for vname, tiles in [("shipped", mosaic_gpu_gemm.Tiles(64, 256, 3)), ("shipped", mosaic_gpu_gemm.Tiles(128, 128, 3)),
                         ("one-wgmma-at-a-time", mosaic_gpu_gemm.Tiles(64, 256, 3)), ("row-major", mosaic_gpu_gemm.Tiles(64, 256, 3))]:
        variant(vname)
        for name, (fn, nvec, nrows, kind) in EPILOGUES.items():
            if vname != "shipped" and name not in ("statistics", "dlogits"):
                continue
            if m == 65536 and kind == "tile":
                continue
            out = ([jax.ShapeDtypeStruct((m,), jnp.float32)] * 2 if kind == "stats"
                   else [jax.ShapeDtypeStruct((m, v), jnp.bfloat16)])
            f = jax.jit(lambda h, e: mosaic_gpu_gemm.matmul(
                h, e, fn, [vec] * nvec, out, b_transposed=True, tiles=tiles, name="probe",
                row_inputs=rows[:nrows]))
            try:
                ms = time_ms(f, h, e, warmup=2, repeats=5, calls=10)
                print(f"M{m} V{v} d{d} {vname:20s} {tiles.block_m}x{tiles.block_n}x{tiles.num_stages} {name:16s} {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s", flush=True)
            except Exception as exc:
                print(f"M{m} V{v} d{d} {tiles} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    variant("shipped")
    xla = jax.jit(lambda h, e: jnp.matmul(h, e.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    ms = time_ms(xla, h, e, warmup=2, repeats=5, calls=10)
    print(f"M{m} V{v} d{d} XLA bf16 GEMM {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s", flush=True)
