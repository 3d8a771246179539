"""Running the Mosaic GPU kernels on a CPU host: jax's Mosaic GPU interpreter, with what jax 0.10's
interpreter lacks emulated (`run_in_the_gpu_interpreter`), for the equivalence suite's CPU cases."""
from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from kernels import compat
from kernels.logits_loss import triton_by_target


def run_in_the_gpu_interpreter(monkeypatch):
    """Mosaic GPU kernels (warp_specialized.launch) run by jax's Mosaic GPU interpreter on CPU,
    with what jax 0.10's interpreter lacks emulated for the kernel's trace: wgmma
    (acc += a b in f32; a from registers or shared memory, b maybe a transposed ref, which the
    interpreter cannot read: ref.transpose only marks it for the emulated wgmma), its
    accumulators (zeros, or pl.run_state's initial value; run_state's other values become refs
    too), layout casts and loads in a layout (it has no layouts), the TMA's reduce-add; and each
    block's threads compiled once, not once a thread and grid step."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic.interpret import thread_map
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.state import types as state_types
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    class Acc:  # an accumulator's value, threaded through the trace instead of registers
        def __init__(self, value):
            self.value = value

        def __getitem__(self, index):
            return self.value

        def __setitem__(self, index, value):
            self.value = value

    class AccType(NamedTuple):
        shape: tuple
        dtype: object
        value: object = None

        @staticmethod
        def init(value):
            return AccType(value.shape, value.dtype, value)

    def operand(x):   # registers, a shared-memory ref, or a transposed one ("T", ref)
        if isinstance(x, tuple):
            return x[1][...].T
        return x if isinstance(x, jax.Array) else x[...]

    def wgmma(acc, a, b):
        acc.value = acc.value + jnp.dot(operand(a), operand(b), preferred_element_type=jnp.float32)

    def copy_smem_to_gmem(*, reduction_op, **kwargs):
        """The TMA's reduce-add (cp.reduce.async.bulk), which jax 0.10's interpreter refuses: its
        plain copy with the store into the destination made dst += src, one copy at a time."""
        if reduction_op is None:
            return real_copy(reduction_op=None, **kwargs)
        memory = type(gpu_callbacks._get_shared_memory())
        dst = gpu_callbacks.HostAllocationKey.from_array(kwargs["dst_allocation_key_as_array"])
        with reduction_lock, monkeypatch.context() as patch:  # one add at a time, as in L2
            store = memory.store_buffer_content

            def add(self, key, rnge, value, thread, *args, **kw):
                if key == dst:
                    value = value + self.get_buffer_content(key, rnge, thread)[0]
                return store(self, key, rnge, value, thread, *args, **kw)
            patch.setattr(memory, "store_buffer_content", add)
            return real_copy(reduction_op=None, **kwargs)

    def run_scoped(f, *types, **kwargs):
        if types and all(isinstance(t, AccType) for t in types):
            return f(*(Acc(jnp.zeros(t.shape, t.dtype)) for t in types))
        return real_run_scoped(f, *types, **kwargs)

    def run_state(f):   # accumulators and arrays: each becomes a ref that f updates
        def run(acc_types):
            accs = jax.tree_util.tree_map(
                lambda t: Acc(t.value if isinstance(t, AccType) else t), acc_types,
                is_leaf=lambda t: isinstance(t, AccType))
            f(accs)
            return jax.tree_util.tree_map(lambda acc: acc.value, accs,
                                          is_leaf=lambda a: isinstance(a, Acc))
        return run

    compiled, compile_lock = {}, threading.Lock()

    def run_jaxpr(jaxpr, consts, *args):
        """One thread of a block (thread_map's body), compiled once per kernel jaxpr and argument
        types: jax's own compiles it anew for every thread at every grid step (an AOT compile,
        which no cache keeps), most of an interpreter case's time."""
        key = (jaxpr, *((x.shape, x.dtype) for x in (*consts, *args)))
        with compile_lock:
            if key not in compiled:
                # a Jaxpr (jax 0.10) or a ClosedJaxpr (later), its consts passed apart either way
                run = lambda consts, *args: jax.core.eval_jaxpr(getattr(jaxpr, "jaxpr", jaxpr),
                                                                consts, *args)
                compiled[key] = jax.jit(run).lower(consts, *args).compile()
        compiled[key](consts, *args)

    real_run_scoped, real_copy = pl.run_scoped, gpu_callbacks.copy_smem_to_gmem
    real_add_by_target = triton_by_target.add_by_target
    reduction_lock = threading.Lock()
    for module, name, value in [
            (thread_map, "_run_jaxpr", run_jaxpr),
            (gpu_callbacks, "copy_smem_to_gmem", copy_smem_to_gmem),
            (plgpu, "wgmma", wgmma), (plgpu, "ACC", AccType), (pl, "run_scoped", run_scoped),
            (pl, "run_state", run_state),
            (plgpu, "wgmma_accumulator_load", lambda acc, wait_n=0: acc.value),
            (state_types.TransformedRef, "transpose", lambda ref, _: ("T", ref)),
            (plgpu, "layout_cast", lambda x, _: x), (mgpu_core, "layout_cast", lambda x, _: x),
            (compat, "mosaic_gpu_load", lambda ref, _: ref[...]),
            (pl, "kernel", functools.partial(pl.kernel, interpret=params.InterpretGPUParams())),
            # the Triton kernel the Mosaic GPU loss head calls, in Pallas's interpret mode
            (triton_by_target, "add_by_target",
             lambda *args, interpret: real_add_by_target(*args, interpret=True))]:
        monkeypatch.setattr(module, name, value)
