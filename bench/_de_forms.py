import jax, jax.numpy as jnp
from bench.common import time_ms
for C, V, d in [(2048, 50432, 768), (8192, 9216, 512)]:
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    ds = jax.random.normal(k[0], (C, V), jnp.bfloat16); h = jax.random.normal(k[1], (C, d), jnp.bfloat16)
    a = jax.jit(lambda de, ds, h: de + jnp.matmul(ds.T, h, preferred_element_type=jnp.float32), donate_argnums=0)
    b = jax.jit(lambda de, ds, h: de + jnp.matmul(h.T, ds, preferred_element_type=jnp.float32), donate_argnums=0)
    c = jax.jit(lambda ds, h: jnp.matmul(ds.T, h, preferred_element_type=jnp.float32))
    t = dict(warmup=3, repeats=5, calls=10); f = 2 * C * V * d / 1e9
    ta = time_ms(lambda ds, h: a(jnp.zeros((V, d)), ds, h), ds, h, **t)
    tb = time_ms(lambda ds, h: b(jnp.zeros((d, V)), ds, h), ds, h, **t)
    tc = time_ms(c, ds, h, **t)
    print(f"C {C} V' {V} d {d}: de += ds^T h {ta:.3f} ms ({f/ta:.0f} TF/s); deT += h^T ds {tb:.3f} ms ({f/tb:.0f}); ds^T h alone {tc:.3f} ms ({f/tc:.0f})")
