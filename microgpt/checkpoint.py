"""Run folders and orbax checkpoints.

A run folder holds everything a run needs, so it can be copied or moved anywhere:
    checkpoints/<step>/state   params, optimizer state and step (orbax StandardSave, atomic)
    checkpoints/<step>/meta    JSON: model and training config, data position, tokenizer file name
    tokenizer.json             the run's tokenizer (meta names it relative to the run folder)
    events.out.tfevents.*      TensorBoard scalars
orbax writes each step into a temporary folder and renames it when complete, so an interrupted save
never leaves a checkpoint that a later `--resume` would trust. Readers never create folders; a
checkpoint that cannot be read raises CheckpointError naming it and the newest one that can.
"""
from __future__ import annotations

import datetime
import logging
import re
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

RUNS_DIR = Path("runs")
TOKENIZER = "tokenizer.json"   # inside the run folder


class CheckpointError(RuntimeError):
    """A run folder or checkpoint that is missing or cannot be read, with what to do instead."""


def new_run_dir(root: Path = RUNS_DIR) -> Path:
    return root / datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")


def checkpoint_manager(run_dir: Path, max_to_keep: int = 3, create: bool = True
                       ) -> ocp.CheckpointManager:
    """The run's checkpoint manager; create=False for readers (a missing folder stays missing)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Save `state` (a pytree of arrays) and `meta` (JSON-able) as checkpoint `step`; blocks until done."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def steps(run_dir: Path) -> list[int]:
    """The steps of the complete checkpoints in `run_dir`, oldest first ([] if there are none)."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return []
    return sorted(checkpoint_manager(run_dir, create=False).all_steps())


def latest_step(run_dir: Path) -> int | None:
    found = steps(run_dir)
    return found[-1] if found else None


def _reader(run_dir: Path) -> ocp.CheckpointManager:
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} holds no run (no {Path(run_dir) / 'checkpoints'}); "
                              "train one with `python -m microgpt.train --out DIR`")
    return checkpoint_manager(run_dir, create=False)


def _chosen_step(run_dir: Path, step: int | None) -> int:
    found = steps(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    if step is None:
        return found[-1]
    if step not in found:
        raise CheckpointError(f"{run_dir} has no checkpoint of step {step}; it has steps "
                              f"{', '.join(map(str, found))}")
    return step


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _read_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]


def _quiet_abandoned_reads() -> None:
    """A failed orbax read leaves its sibling reads' exceptions unretrieved, which asyncio logs
    (a traceback each, hundreds) when they are collected: after a read has failed, the error
    raised in their stead says it all."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        abandoned = code is not None and "orbax" in code.co_filename
        closed = "Event loop is closed" in str(unraisable.exc_value)  # their callbacks, late
        if not (abandoned or closed):
            previous(unraisable)
    sys.unraisablehook = hook


def _damaged(run_dir: Path, manager: ocp.CheckpointManager, step: int, err: Exception,
             readable) -> CheckpointError:
    """The error for a checkpoint orbax could not read: which step, why in a line, and the
    newest earlier step that `readable(step)` reads whole (if any)."""
    _quiet_abandoned_reads()
    reason = re.split(r"(?<=\.)\s", (str(err).strip().splitlines() or [""])[0])[0][:200]
    intact = None
    for earlier in reversed([s for s in steps(run_dir) if s < step]):
        try:
            readable(manager, earlier)
        except Exception:  # noqa: BLE001 - any failure to read means this one is damaged too
            continue
        intact = earlier
        break
    advice = (f"step {intact} is intact: pass --step {intact} to use it" if intact is not None
              else "no earlier checkpoint is intact")
    return CheckpointError(f"checkpoint step {step} in {run_dir} is damaged "
                           f"({type(err).__name__}: {reason}); {advice}")


def restore_meta(run_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of checkpoint `step` (default: the latest) in `run_dir`."""
    manager = _reader(run_dir)
    step = _chosen_step(run_dir, step)
    try:
        return step, _read_meta(manager, step)
    except Exception as err:  # noqa: BLE001 - orbax raises many kinds on a damaged checkpoint
        raise _damaged(run_dir, manager, step, err, _read_meta) from err


def restore_state(run_dir: Path, step: int, abstract_state):
    """The state pytree of checkpoint `step`, shaped (and sharded) like `abstract_state`."""
    manager = _reader(run_dir)
    try:
        return _read_state(manager, step, abstract_state)
    except Exception as err:  # noqa: BLE001 - orbax raises many kinds on a damaged checkpoint
        readable = lambda m, s: (_read_meta(m, s), _read_state(m, s, abstract_state))
        raise _damaged(run_dir, manager, step, err, readable) from err


def tokenizer_path(run_dir: Path, meta: dict) -> Path:
    """The run's tokenizer: the file meta names, inside the run folder (runs written before the
    name was stored relative to the folder name a path; its file name is the one inside)."""
    path = Path(run_dir) / Path(meta.get("tokenizer", TOKENIZER)).name
    if not path.is_file():
        raise CheckpointError(f"the run's tokenizer {path} is missing")
    return path


def set_aside_after(run_dir: Path, step: int) -> list[int]:
    """Move the checkpoints after `step` to <run>/set-aside/<step>/ (resuming from an earlier
    step would overwrite them; they are kept, not deleted). -> the steps moved."""
    later = [s for s in steps(run_dir) if s > step]
    for s in later:
        target = Path(run_dir) / "set-aside" / str(s)
        target.parent.mkdir(exist_ok=True)
        (Path(run_dir) / "checkpoints" / str(s)).rename(target)
    return later


def newest_run(root: Path = RUNS_DIR) -> Path:
    """The most recently written run folder under `root` that holds a checkpoint."""
    runs = [p for p in Path(root).glob("*/checkpoints") if p.is_dir() and any(p.iterdir())]
    if not runs:
        raise CheckpointError(
            f"no trained run under {Path(root).absolute()}: train one with `python -m microgpt.train`")
    return max(runs, key=lambda p: p.stat().st_mtime).parent
