"""Train a microGPT: `python -m microgpt.train [flags]` (see --help).

With no flags it trains a small preset on the embedded Shakespeare corpus (a few minutes on a laptop
CPU), evaluates, checkpoints and prints a sample. The loop is plain: batch -> jitted step -> log;
every `--eval-every` steps: val loss, checkpoint. Data-parallel over all local devices: the batch is
sharded over a 1-D 'data' mesh; the parameters and optimizer state are replicated, with the
gradients all-reduced, or with --shard fsdp split over the devices (microgpt/sharding.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from kernels import tuning
from microgpt import checkpoint, data, sharding
from microgpt.cli import DefaultsHelpFormatter
from microgpt.gpt import KERNELS, PRESETS, MicroGPT
from microgpt.profiling import StepProfiler
from microgpt.run import TrainConfig, make_optimizer, preset_defaults
from microgpt.sharding import AXIS


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float]          # step -> training loss
    val_losses: dict[int, float]      # step -> validation loss
    stopped: str = "finished"         # "finished" | "interrupted" | "nan"


class NonFiniteLoss(RuntimeError):
    pass


class RunError(ValueError):
    """A run that cannot start as asked, with a message saying why and what to do."""


# Flags a resumed run takes from the command line; every other one must match the checkpoint.
# (The sharding too: a checkpoint restores onto any device count and either layout.)
RESUME_OVERRIDES = ("max_steps", "decay_steps", "eval_every", "eval_batches", "log_every",
                    "shard")


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every local device), axis 'data'."""
    return Mesh(np.array(devices or jax.devices()), (AXIS,))


def device_loss(model: MicroGPT, mesh: Mesh, shard: str):
    """(the parameters' PartitionSpecs, fn(params, x, y) -> the loss of one device's rows under
    shard_map, its params as `shard` holds them: whole, or its parts gathered block by block)."""
    param_specs = sharding.specs(jax.eval_shape(model.get_params), shard, mesh.size)

    def loss(params, x, y):
        return model.loss(sharding.held(params, param_specs), x, y, gather=sharding.gather)
    return param_specs, loss


def make_train_step(model: MicroGPT, optimizer, mesh: Mesh, shard: str = "replicate"):
    """The jitted step. Loss and gradients run per device under shard_map (the kernels see their
    shard's shapes); `shard` (microgpt/sharding.py) says how the parameters are held: replicate,
    the gradients averaged over 'data' before the replicated optimizer update; fsdp, each block's
    weights all-gathered as it runs, the gradients reduce-scattered, the update on the shards."""
    param_specs, loss_of_rows = device_loss(model, mesh, shard)

    def local_grads(params, x, y):
        loss, grads = jax.value_and_grad(loss_of_rows)(params, x, y)
        # An array split over the devices (fsdp) has its gradient summed into its shards by the
        # all-gather's transpose; one held whole has each device's own, to average.
        mean = lambda g, s: g / mesh.size if AXIS in s else jax.lax.pmean(g, AXIS)
        return jax.lax.pmean(loss, AXIS), jax.tree_util.tree_map(mean, grads, param_specs)

    # check_vma=False: Pallas kernels declare plain output shapes, without the varying-axes
    # annotations the check needs; the means above make the outputs replicated explicitly.
    grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(param_specs, P(AXIS), P(AXIS)),
                          out_specs=(P(), param_specs), check_vma=False)

    def step(params, opt_state, x, y):
        loss, g = grads(params, x, y)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state,
                {"loss": loss, "grad_norm": optax.tree.norm(g)})
    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_loss(model: MicroGPT, mesh: Mesh, shard: str = "replicate"):
    """The jitted mean loss of a batch sharded over 'data', per device like the train step."""
    param_specs, loss_of_rows = device_loss(model, mesh, shard)
    return jax.jit(jax.shard_map(lambda *a: jax.lax.pmean(loss_of_rows(*a), AXIS), mesh=mesh,
                                 in_specs=(param_specs, P(AXIS), P(AXIS)), out_specs=P(),
                                 check_vma=False))


class _StopOnSignal:
    """Turns the first Ctrl-C into a flag the loop checks between steps (so the checkpoint is
    consistent); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _checkpoint_meta(cfg: TrainConfig, step: int, prepared: data.PreparedData) -> dict:
    return {"config": dataclasses.asdict(cfg), "step": step,
            "data_position": {"seed": cfg.seed, "next_step": step},
            "tokenizer": checkpoint.TOKENIZER, "vocab": prepared.vocab_size,
            "kernels": cfg.kernels}


def _absolute_data(cfg: TrainConfig) -> TrainConfig:
    """--data as an absolute path, so the run resumes from any directory."""
    return dataclasses.replace(cfg, data=cfg.data and os.path.abspath(cfg.data))


def _resolve_run(cfg: TrainConfig, out: str | None, resume: bool, step: int | None
                 ) -> tuple[TrainConfig, Path, int | None]:
    """(config, run folder, step to resume from or None). On resume the checkpoint's config wins."""
    if not resume:
        if step is not None:
            raise RunError("--step chooses the checkpoint to resume from: it needs --resume")
        run_dir = Path(out) if out else checkpoint.new_run_dir()
        if checkpoint.latest_step(run_dir) is not None:
            raise RunError(f"{run_dir} already holds a run: pass --resume to continue it, "
                           "or choose another --out")
        return _absolute_data(cfg), run_dir, None
    run_dir = Path(out) if out else checkpoint.newest_run()
    step, meta = checkpoint.restore_meta(run_dir, step)
    return TrainConfig(**meta["config"]), run_dir, step


def _apply_resume_flags(stored: TrainConfig, explicit: dict, step: int) -> TrainConfig:
    """The stored config with the flags a resumed run may change (RESUME_OVERRIDES) applied;
    any other flag given that differs from the checkpoint is an error naming it. Extending
    --max-steps keeps the stored schedule (the cosine ends where it did; the new steps run at
    end_lr) unless --decay-steps is given too."""
    if explicit.get("data"):   # stored absolute (_absolute_data)
        explicit = {**explicit, "data": os.path.abspath(explicit["data"])}
    conflicts = [f"--{k.replace('_', '-')}={v!r} (the checkpoint has {getattr(stored, k)!r})"
                 for k, v in explicit.items()
                 if k not in RESUME_OVERRIDES and getattr(stored, k) != v]
    if conflicts:
        raise RunError("--resume continues the stored run; these flags differ from it: "
                       + ", ".join(conflicts))
    changes = {k: v for k, v in explicit.items() if k in RESUME_OVERRIDES}
    if changes.get("max_steps", stored.max_steps) < step:
        raise RunError(f"the run is at step {step}; --max-steps={changes['max_steps']} would end "
                       "before it")
    if "max_steps" in changes and "decay_steps" not in changes and stored.decay_steps is None:
        changes["decay_steps"] = stored.max_steps
    return dataclasses.replace(stored, **changes)


def memory_lower_bound(cfg: TrainConfig, vocab: int, num_devices: int) -> tuple[int, str]:
    """(bytes, what) that one device holds at least during a training step: parameters with their
    gradients and AdamW moments (16 bytes each; a 1 / num_devices share of them with fsdp), the
    bfloat16 logits [b, S, V] of the device's b
    rows, and where attention is not a flash kernel (reference; xla off the GPU, where there is no
    cuDNN) the float32 probabilities [b, H, S, S] that every block keeps for its backward (with
    the document mask, xla's too: its masked path is XLA's)."""
    model = dataclasses.replace(cfg, document_mask=False).model(vocab)   # its parameters only
    rows = max(1, cfg.batch_size // num_devices)
    shares = num_devices if cfg.shard == "fsdp" else 1
    parts = {"parameters and optimizer state": 16 * model.count_params() // shares,
             f"logits [{rows}, {cfg.seq_len}, {vocab}]": 2 * rows * cfg.seq_len * vocab}
    if cfg.kernels == "reference" or (cfg.kernels == "xla" and (jax.default_backend() != "gpu"
                                                                 or cfg.document_mask)):
        parts[f"attention probabilities [{rows}, {cfg.heads}, {cfg.seq_len}, {cfg.seq_len}] "
              f"float32 in each of {model.num_layers} blocks"] = (
            4 * model.num_layers * rows * cfg.heads * cfg.seq_len ** 2)
    what = ", ".join(f"{name}: {_gigabytes(size)}" for name, size in parts.items())
    return sum(parts.values()), what


def device_memory() -> int | None:
    """Bytes one device may allocate: an accelerator's limit, or on CPU the host's memory shared
    by its devices; None where unknown."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return host // jax.local_device_count() if device.platform == "cpu" else None


def _gigabytes(size: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e6:.1f} MB"


def check_memory(cfg: TrainConfig, vocab: int, num_devices: int) -> None:
    """Refuse, before anything is allocated, a run whose lower bound exceeds a device's memory."""
    need, what = memory_lower_bound(cfg, vocab, num_devices)
    have = device_memory()
    if have is not None and need > have:
        hint = "" if cfg.kernels == "pallas" else ("; --kernels pallas keeps no [S, S] array"
                                                    if "attention" in what else "")
        raise RunError(f"--seq-len {cfg.seq_len} with --batch-size {cfg.batch_size} needs at "
                       f"least {_gigabytes(need)} on each of {num_devices} "
                       f"{jax.default_backend()} device(s) ({what}), which have "
                       f"{_gigabytes(have)}: lower --seq-len or --batch-size{hint}")


def parse_steps(spec: str) -> tuple[int, int]:
    """"20:25" -> (20, 25): profile the steps 20 <= step < 25."""
    try:
        first, last = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps wants START:STOP, e.g. 20:25; got {spec!r}") from None
    if not 0 <= first < last:
        raise ValueError(f"--profile-steps {spec!r}: need 0 <= START < STOP")
    return first, last


def train(cfg: TrainConfig, out: str | None = None, resume: bool = False,
          explicit: dict | None = None, sample: bool = True, profile_dir: str | None = None,
          profile_steps: tuple[int, int] = (20, 25), resume_step: int | None = None
          ) -> TrainResult:
    """Train (or resume) a run; returns per-step losses. `explicit`: the flags the user gave
    (TrainConfig fields), which a resumed run applies where it may (RESUME_OVERRIDES) and refuses
    otherwise when they differ from the checkpoint. `resume_step`: the checkpoint to resume from
    (default: the latest; later ones are set aside). With `profile_dir`, the steps in
    `profile_steps` are traced with jax.profiler for TensorBoard's profile plugin. A new run that
    fails before its first step leaves no run folder behind."""
    cfg, run_dir, start = _resolve_run(cfg, out, resume, resume_step)
    if start is not None:
        stored = cfg
        cfg = _apply_resume_flags(stored, explicit or {}, start)
        for name in RESUME_OVERRIDES:
            if getattr(cfg, name) != getattr(stored, name):
                print(f"--{name.replace('_', '-')}: {getattr(stored, name)} -> "
                      f"{getattr(cfg, name)}" + (" (the learning rate's cosine keeps its length; "
                                                 "--decay-steps changes it)"
                                                 if name == "decay_steps" else ""))
    if cfg.kernels not in KERNELS:
        raise RunError(f"--kernels={cfg.kernels!r} is not available; choose from {KERNELS}")
    mesh = data_mesh()
    if cfg.batch_size % mesh.size:
        raise RunError(f"--batch-size={cfg.batch_size} must be divisible by the {mesh.size} devices")
    check_memory(cfg, cfg.vocab, mesh.size)

    prepared = data.prepare_corpus(cfg.data, cfg.dataset, vocab_size=cfg.vocab,
                                   text_field=cfg.text_field)
    data.check_context(prepared, cfg.seq_len)
    if prepared.vocab_size < cfg.vocab:   # a corpus with too few merges (data.train_tokenizer)
        print(f"note: the tokenizer has {prepared.vocab_size} tokens, fewer than the {cfg.vocab} "
              "of --vocab: the corpus has no more merges to learn; the model's embedding takes "
              "the tokenizer's size")
    created = start is None and not run_dir.exists()
    result = TrainResult(run_dir, start or 0, {}, {})
    try:
        return _train(cfg, result, start, prepared, mesh, sample, profile_dir, profile_steps)
    except BaseException:
        if created and result.step == 0:   # nothing was trained: nothing to keep
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, result: TrainResult, start: int | None,
           prepared: data.PreparedData, mesh: Mesh, sample: bool, profile_dir: str | None,
           profile_steps: tuple[int, int]) -> TrainResult:
    """The run itself (see `train`); result.step follows the steps as they complete."""
    run_dir = result.run_dir
    train_tokens, val_tokens = prepared.train_tokens(), prepared.val_tokens()
    model = cfg.model(prepared.vocab_size, prepared.eot_id)
    optimizer, schedule = make_optimizer(cfg)
    batch_sharded = NamedSharding(mesh, P(AXIS))

    def init_state():
        params = model.get_params(jax.random.PRNGKey(cfg.seed))
        return {"params": params, "opt_state": optimizer.init(params)}

    abstract = jax.eval_shape(init_state)
    state_shardings = sharding.shardings(abstract, cfg.shard, mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
    if start is None:
        state = jax.jit(init_state, out_shardings=state_shardings)()
        step = 0
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prepared.tokenizer_path, run_dir / checkpoint.TOKENIZER)
    else:
        state = checkpoint.restore_state(run_dir, start, abstract)
        step = start
        moved = checkpoint.set_aside_after(run_dir, step)
        print(f"resuming {run_dir} at step {step}" + (
            f" (the later checkpoints {', '.join(map(str, moved))} moved to "
            f"{run_dir / 'set-aside'})" if moved else ""))

    params, opt_state = state["params"], state["opt_state"]
    train_step = make_train_step(model, optimizer, mesh, cfg.shard)
    eval_loss = make_eval_loss(model, mesh, cfg.shard)
    manager = checkpoint.checkpoint_manager(run_dir)

    # Each process feeds its own rows of the global batch (the batch is a pure function of
    # (seed, step), so every process can cut its slice); one process feeds them all.
    rows = cfg.batch_size // jax.process_count()
    local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

    def put(batch):
        return tuple(jax.make_array_from_process_local_data(batch_sharded, b[local]) for b in batch)

    val_batches = [put(b) for b in data.eval_batches(val_tokens, cfg.batch_size, cfg.seq_len,
                                                     cfg.eval_batches)]

    def evaluate() -> float:
        return float(np.mean([float(eval_loss(params, x, y)) for x, y in val_batches]))

    def save(at_step: int) -> None:
        checkpoint.save(manager, at_step, {"params": params, "opt_state": opt_state},
                        _checkpoint_meta(cfg, at_step, prepared))

    from tensorboardX import SummaryWriter  # imported here: heavy, and only the trainer needs it
    writer = SummaryWriter(str(run_dir))
    pending: list[tuple[int, dict]] = []   # device-side metrics not yet read (reading syncs)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(f"{cfg.preset}: {model.count_params():,} parameters, d={cfg.model_d}, heads={cfg.heads}, "
          f"vocab={prepared.vocab_size}, kernels={cfg.kernels}, "
          f"document mask {'on' if cfg.document_mask else 'off'}, {mesh.size} device(s) "
          f"[{jax.devices()[0].device_kind}]; run folder {run_dir}")
    held, whole = sharding.bytes_per_device(state), sum(
        a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(abstract))
    print(f"parameters and AdamW state ({cfg.shard}): {_gigabytes(held)} a device, "
          f"{_gigabytes(whole)} in all")
    if cfg.kernels == "pallas" and jax.default_backend() == "cpu":
        print("note: --kernels=pallas on CPU runs the kernels in interpret mode (slow)")

    def flush(bar, t_last: float, n_steps: int) -> None:
        """Read pending metrics to the host, log them, and stop on a non-finite loss."""
        for s, m in pending:
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not math.isfinite(loss):
                last = checkpoint.latest_step(run_dir)
                raise NonFiniteLoss(
                    f"loss became {loss} at step {s}; stopping. " + (
                        f"The last good checkpoint is step {last} in {run_dir}" if last is not None
                        else "No checkpoint was written before it."))
            result.losses[s] = loss
            writer.add_scalar("train/loss", loss, s)
            writer.add_scalar("train/grad_norm", grad_norm, s)
            writer.add_scalar("train/lr", float(schedule(s)), s)
        if pending and n_steps:
            tok_s = n_steps * tokens_per_step / (time.perf_counter() - t_last)
            writer.add_scalar("train/tokens_per_sec", tok_s, pending[-1][0])
            bar.set_postfix(loss=f"{result.losses[pending[-1][0]]:.3f}", tok_s=f"{tok_s:,.0f}")
        pending.clear()

    def run_eval(at_step: int) -> None:
        val = evaluate()
        result.val_losses[at_step] = val
        writer.add_scalar("val/loss", val, at_step)
        writer.add_scalar("val/perplexity", math.exp(min(val, 50.0)), at_step)
        tqdm.write(f"step {at_step}: val loss {val:.4f}, perplexity {math.exp(min(val, 50.0)):.1f}")

    if step == 0:
        run_eval(0)
    t_last, steps_since = time.perf_counter(), 0
    profiler = StepProfiler(profile_dir, profile_steps)
    tuning.used_entries(clear=True)   # the first step's trace says which tiles it took
    with _StopOnSignal() as stop, tqdm(total=cfg.max_steps, initial=step, desc="train",
                                       dynamic_ncols=True) as bar:
        try:
            while step < cfg.max_steps:
                x, y = put(data.get_batch(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, step))
                profiler.before_step(step)
                params, opt_state, metrics = train_step(params, opt_state, x, y)
                if cfg.kernels == "pallas" and step == (start or 0):   # traced: tiles chosen
                    for entry in tuning.used_entries():
                        tqdm.write(f"tuning: {entry.describe()}")
                profiler.after_step(step, metrics)
                pending.append((step, metrics))
                step += 1
                result.step = step
                steps_since += 1
                bar.update(1)
                at_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
                if step % cfg.log_every == 0 or at_eval or stop.requested:
                    flush(bar, t_last, steps_since)
                    t_last, steps_since = time.perf_counter(), 0
                if at_eval:
                    run_eval(step)
                    save(step)
                if stop.requested:
                    if not at_eval:   # an eval step has just saved this step
                        save(step)
                    result.stopped = "interrupted"
                    tqdm.write(f"interrupted: checkpoint saved at step {step} in {run_dir}; "
                               f"continue with --resume --out {run_dir}")
                    break
        except NonFiniteLoss as err:
            result.stopped = "nan"
            tqdm.write(f"error: {err}")
        finally:
            profiler.stop(params)
    writer.close()
    result.step = step
    if sample and result.stopped == "finished":
        from microgpt.generate import generate_from_params
        try:
            text = generate_from_params(model, params, prepared.tokenizer, prompt="",
                                        max_new_tokens=80, context=cfg.seq_len,
                                        rng=jax.random.PRNGKey(cfg.seed))
        except KeyboardInterrupt:
            result.stopped = "interrupted"
            print(f"interrupted during the sample; the run is complete, saved at step {step} "
                  f"in {run_dir}")
            return result
        print("sample:\n" + text)
    return result


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m microgpt.train", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    own = preset_defaults("gpt2_small")   # the preset with a shape of its own
    p.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset,
                   help="micro_gpt_1, 2 or 4: that many blocks, sized by the flags below; "
                        f"gpt2_small: {PRESETS['gpt2_small'].num_layers} blocks, d {own['model_d']}, {own['heads']} heads, "
                        f"vocabulary {own['vocab']}, seq-len {own['seq_len']}, where the flags "
                        "below are not given")
    p.add_argument("--model-d", type=int, default=defaults.model_d,
                   help=f"model width d; gpt2_small's: {own['model_d']}")
    p.add_argument("--heads", type=int, default=defaults.heads,
                   help=f"attention heads (head_dim = d / heads); gpt2_small's: {own['heads']}")
    p.add_argument("--vocab", type=int, default=defaults.vocab,
                   help="BPE vocabulary size (at most: a small corpus gives fewer tokens); "
                        f"gpt2_small's: {own['vocab']}")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="sequences per step, over all devices")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len,
                   help=f"tokens per sequence; gpt2_small's: {own['seq_len']}")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help="train until this step (with --resume: extend the run to it)")
    p.add_argument("--decay-steps", type=int,
                   help="the learning rate's cosine length (default: --max-steps; a resumed run "
                        "keeps its own)")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between validation and checkpoints")
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches,
                   help="validation batches per evaluation")
    p.add_argument("--log-every", type=int, default=defaults.log_every,
                   help="steps between logged losses")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="initialisation and batch order")
    p.add_argument("--kernels", choices=KERNELS, default=defaults.kernels,
                   help="the ops' implementation (README: Kernels)")
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction,
                   default=defaults.document_mask,
                   help="no attention across the <|endoftext|>-separated documents of a window")
    p.add_argument("--shard", choices=sharding.SHARDINGS, default=defaults.shard,
                   help="parameters and optimizer state over the devices: replicate, or fsdp "
                        "(each array split over them, gathered block by block in the step)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a .txt file, a folder of .txt files, or a .jsonl/.parquet file "
                                    "(default: the embedded Shakespeare)")
    src.add_argument("--dataset", help="a Hugging Face dataset name (needs the `data` extra)")
    p.add_argument("--text-field", default=defaults.text_field,
                   help="the text field of .jsonl/.parquet records and datasets")
    p.add_argument("--out", help="run folder (default: runs/run-<time>; with --resume: the newest "
                                 "run under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--step", type=int, help="with --resume: the checkpoint to continue from "
                                            "(default: the latest; later ones are set aside)")
    p.add_argument("--profile-dir", help="write a jax.profiler trace here (e.g. profiles/NAME)")
    p.add_argument("--profile-steps", default="20:25", help="START:STOP, the steps to trace")
    return p


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace, dict]:
    """-> (config, all arguments, the config fields given on the command line)."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        args.profile_steps = parse_steps(args.profile_steps)
    except ValueError as err:
        p.error(str(err))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    # The flags typed, default values too: a parse in which nothing has a default.
    given = _parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    explicit = {k: values[k] for k in vars(given.parse_args(argv)) if k in fields}
    # A preset with a shape of its own (gpt2_small) sets the sizes that were not typed.
    values.update({k: v for k, v in preset_defaults(values["preset"]).items()
                   if k not in explicit})
    for name, positive in [("batch_size", 1), ("seq_len", 2), ("max_steps", 1), ("eval_every", 1),
                           ("eval_batches", 1), ("log_every", 1), ("model_d", 2), ("heads", 1),
                           ("decay_steps", 1)]:
        if values[name] is not None and values[name] < positive:
            p.error(f"--{name.replace('_', '-')} must be at least {positive}")
    if values["model_d"] % values["heads"]:
        p.error(f"--model-d={values['model_d']} is not divisible by --heads={values['heads']}")
    return TrainConfig(**values), args, explicit


def main(argv=None) -> int:
    cfg, args, explicit = parse_args(argv)
    try:
        result = train(cfg, out=args.out, resume=args.resume, explicit=explicit,
                       profile_dir=args.profile_dir, profile_steps=args.profile_steps,
                       resume_step=args.step)
    except (data.DataError, checkpoint.CheckpointError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the second Ctrl-C: stop at once, the checkpoints stay as they are
        print("aborted", file=sys.stderr)
        return 130
    return {"finished": 0, "interrupted": 130, "nan": 1}[result.stopped]


if __name__ == "__main__":
    sys.exit(main())
