"""Run folders and orbax checkpoints.

A run folder holds:
    checkpoints/<step>/state   params, optimizer state and step (orbax StandardSave, atomic)
    checkpoints/<step>/meta    JSON: model and training config, tokenizer path, data position
    events.out.tfevents.*      TensorBoard scalars
orbax writes each step into a temporary folder and renames it when complete, so an interrupted save
never leaves a checkpoint that a later `--resume` would trust.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import jax
import orbax.checkpoint as ocp

RUNS_DIR = Path("runs")


def new_run_dir(root: Path = RUNS_DIR) -> Path:
    return root / datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")


def checkpoint_manager(run_dir: Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Save `state` (a pytree of arrays) and `meta` (JSON-able) as checkpoint `step`; blocks until done."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def latest_step(run_dir: Path) -> int | None:
    path = Path(run_dir) / "checkpoints"
    if not path.is_dir():
        return None
    return checkpoint_manager(run_dir).latest_step()


def restore_meta(run_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of checkpoint `step` (default: the latest) in `run_dir`."""
    manager = checkpoint_manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, meta


def restore_state(run_dir: Path, step: int, abstract_state):
    """The state pytree of checkpoint `step`, shaped (and sharded) like `abstract_state`."""
    manager = checkpoint_manager(run_dir)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]


def newest_run(root: Path = RUNS_DIR) -> Path:
    """The most recently written run folder under `root` that holds a checkpoint."""
    runs = [p for p in Path(root).glob("*/checkpoints") if p.is_dir() and any(p.iterdir())]
    if not runs:
        raise FileNotFoundError(
            f"no trained run under {Path(root).absolute()}: train one with `python -m microgpt.train`")
    return max(runs, key=lambda p: p.stat().st_mtime).parent
