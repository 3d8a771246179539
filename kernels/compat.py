"""The one place where this project branches on the JAX version (0.10.x locally, 0.11.x on the GPU)."""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def mosaic_gpu_row_layout():
    """The register layout of a per-row statistic (max, sum) of a wgmma accumulator tile.

    jax 0.10 spells it Layout.WGMMA.reduce(1); older Pallas Mosaic GPU had Layout.WGMMA_ROW.
    (A feature test rather than a version number: the spelling moved between point releases.)
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA
    return layout.reduce(1) if hasattr(layout, "reduce") else plgpu.Layout.WGMMA_ROW


def mosaic_gpu_column_layout():
    """The register layout of a per-column vector of a wgmma accumulator tile (one value per
    column, broadcast over rows): Layout.WGMMA.reduce(0), formerly Layout.WGMMA_COL."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA
    return layout.reduce(0) if hasattr(layout, "reduce") else plgpu.Layout.WGMMA_COL


def mosaic_gpu_load(ref, layout):
    """All of a shared-memory ref into registers in `layout`: plgpu.load(ref, layout=...) in jax
    0.11, which deprecates the index argument that jax 0.10 requires."""
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    index = inspect.signature(plgpu.load).parameters["idx"]
    if index.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)
