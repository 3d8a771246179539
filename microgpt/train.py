"""Train a microGPT: `python -m microgpt.train [flags]` (see --help).

With no flags it trains a small preset on the embedded Shakespeare corpus (a few minutes on a laptop
CPU), evaluates, checkpoints and prints a sample. The loop is plain: batch -> jitted step -> log;
every `--eval-every` steps: val loss, checkpoint. Data-parallel over all local devices: the batch is
sharded over a 1-D 'data' mesh, parameters are replicated, and XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
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

from microgpt import checkpoint, data
from microgpt.model import KERNELS, PRESETS, MicroGPT


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "micro_gpt_2"
    model_d: int = 128
    heads: int = 4
    vocab: int = 9000
    batch_size: int = 16
    seq_len: int = 128
    max_steps: int = 500
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    kernels: str = "reference"
    data: str | None = None
    dataset: str | None = None
    text_field: str = "text"
    # The original microGPT's optimizer: AdamW on a warmup + cosine schedule, clipped gradients.
    peak_lr: float = 5e-4
    warmup_steps: int = 100
    end_lr: float = 1e-5
    weight_decay: float = 0.01
    clip_norm: float = 1.0

    def model(self, vocab: int) -> MicroGPT:
        return PRESETS[self.preset](vocab=vocab, model_d=self.model_d, num_heads=self.heads,
                                    kernels=self.kernels)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float]          # step -> training loss
    val_losses: dict[int, float]      # step -> validation loss
    stopped: str = "finished"         # "finished" | "interrupted" | "nan"


class NonFiniteLoss(RuntimeError):
    pass


def make_optimizer(cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=min(cfg.warmup_steps, cfg.max_steps),
        decay_steps=max(cfg.max_steps, cfg.warmup_steps + 1), end_value=cfg.end_lr)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                            optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optimizer, schedule


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every local device), axis 'data'."""
    return Mesh(np.array(devices or jax.devices()), ("data",))


def make_train_step(model: MicroGPT, optimizer, mesh: Mesh):
    """The jitted step. Loss and gradients run per device under shard_map (the kernels see their
    shard's shapes); gradients are averaged over 'data' before the (replicated) optimizer update."""
    def local_grads(params, x, y):
        loss, grads = jax.value_and_grad(model.loss)(params, x, y)
        return jax.lax.pmean((loss, grads), "data")   # the full batch's mean loss and gradient

    # check_vma=False: Pallas kernels declare plain output shapes, without the varying-axes
    # annotations the check needs; the pmean above makes the outputs replicated explicitly.
    grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                          out_specs=(P(), P()), check_vma=False)

    def step(params, opt_state, x, y):
        loss, g = grads(params, x, y)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state,
                {"loss": loss, "grad_norm": optax.tree.norm(g)})
    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_loss(model: MicroGPT, mesh: Mesh):
    """The jitted mean loss of a batch sharded over 'data', per device like the train step."""
    def local_loss(params, x, y):
        return jax.lax.pmean(model.loss(params, x, y), "data")
    return jax.jit(jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=P(), check_vma=False))


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


def _checkpoint_meta(cfg: TrainConfig, step: int, prepared: data.PreparedData, run_dir: Path) -> dict:
    return {"config": dataclasses.asdict(cfg), "step": step,
            "data_position": {"seed": cfg.seed, "next_step": step},
            "tokenizer": str(run_dir / "tokenizer.json"), "vocab": prepared.vocab_size,
            "kernels": cfg.kernels}


def _resolve_run(cfg: TrainConfig, out: str | None, resume: bool) -> tuple[TrainConfig, Path, int | None]:
    """(config, run folder, step to resume from or None). On resume the checkpoint's config wins."""
    if not resume:
        run_dir = Path(out) if out else checkpoint.new_run_dir()
        if checkpoint.latest_step(run_dir) is not None:
            raise SystemExit(f"{run_dir} already holds a run: pass --resume to continue it, "
                             "or choose another --out")
        return cfg, run_dir, None
    run_dir = Path(out) if out else checkpoint.newest_run()
    step, meta = checkpoint.restore_meta(run_dir)
    return TrainConfig(**meta["config"]), run_dir, step


def _overrides_conflict(stored: TrainConfig, explicit: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v!r} (checkpoint has {getattr(stored, k)!r})"
            for k, v in explicit.items() if getattr(stored, k) != v]


def parse_steps(spec: str) -> tuple[int, int]:
    """"20:25" -> (20, 25): profile the steps 20 <= step < 25."""
    try:
        first, last = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps wants START:STOP, e.g. 20:25; got {spec!r}") from None
    if not 0 <= first < last:
        raise ValueError(f"--profile-steps {spec!r}: need 0 <= START < STOP")
    return first, last


def profiler_options() -> jax.profiler.ProfileOptions:
    """What a capture records: device activity and the runtime's host events, without the Python
    tracer, whose every-function-call events made a 3-step GPU capture of micro_gpt_4 103 MB
    gzipped, too large for the trace viewer's converter (it died converting it)."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


class _StepProfiler:
    """A jax.profiler trace of the steps first <= step < last, written to `directory`."""

    def __init__(self, directory: str | None, steps: tuple[int, int]):
        self.directory, (self.first, self.last) = directory, steps
        self.active = False

    def before_step(self, step: int) -> None:
        if self.directory and step == self.first:
            jax.profiler.start_trace(self.directory, profiler_options=profiler_options())
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step + 1 >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)   # the traced steps' device work belongs in the trace
            jax.profiler.stop_trace()
            self.active = False
            tqdm.write(f"profile of steps {self.first}:{self.last} written to {self.directory} "
                       f"(tensorboard --logdir {self.directory})")


def train(cfg: TrainConfig, out: str | None = None, resume: bool = False,
          explicit: dict | None = None, sample: bool = True, profile_dir: str | None = None,
          profile_steps: tuple[int, int] = (20, 25)) -> TrainResult:
    """Train (or resume) a run; returns per-step losses. `explicit`: flags the user typed, which a
    resumed run refuses to silently ignore. With `profile_dir`, the steps in `profile_steps` are
    traced with jax.profiler for TensorBoard's profile plugin."""
    cfg, run_dir, start = _resolve_run(cfg, out, resume)
    if start is not None and explicit:
        conflicts = _overrides_conflict(cfg, explicit)
        if conflicts:
            raise SystemExit("--resume continues the stored run; these flags differ from it: "
                             + ", ".join(conflicts))
    if cfg.kernels not in KERNELS:
        raise SystemExit(f"--kernels={cfg.kernels!r} is not available; choose from {KERNELS}")

    prepared = data.prepare_corpus(cfg.data, cfg.dataset, vocab_size=cfg.vocab,
                                   text_field=cfg.text_field)
    train_tokens, val_tokens = prepared.train_tokens(), prepared.val_tokens()
    data.check_context(prepared, cfg.seq_len)

    model = cfg.model(prepared.vocab_size)
    optimizer, schedule = make_optimizer(cfg)
    mesh = data_mesh()
    if cfg.batch_size % mesh.size:
        raise SystemExit(f"--batch-size={cfg.batch_size} must be divisible by the {mesh.size} devices")
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def init_state():
        params = model.get_params(jax.random.PRNGKey(cfg.seed))
        return {"params": params, "opt_state": optimizer.init(params)}

    abstract = jax.eval_shape(init_state)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    if start is None:
        state = jax.jit(init_state, out_shardings=replicated)()
        step = 0
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prepared.tokenizer_path, run_dir / "tokenizer.json")
    else:
        state = checkpoint.restore_state(run_dir, start, abstract)
        step = start
        print(f"resuming {run_dir} at step {step}")

    params, opt_state = state["params"], state["opt_state"]
    train_step = make_train_step(model, optimizer, mesh)
    eval_loss = make_eval_loss(model, mesh)
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
                        _checkpoint_meta(cfg, at_step, prepared, run_dir))

    from tensorboardX import SummaryWriter  # imported here: heavy, and only the trainer needs it
    writer = SummaryWriter(str(run_dir))
    result = TrainResult(run_dir, step, {}, {})
    pending: list[tuple[int, dict]] = []   # device-side metrics not yet read (reading syncs)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(f"{cfg.preset}: {model.count_params():,} parameters, d={cfg.model_d}, heads={cfg.heads}, "
          f"vocab={prepared.vocab_size}, kernels={cfg.kernels}, {mesh.size} device(s) "
          f"[{jax.devices()[0].device_kind}]; run folder {run_dir}")
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
    profiler = _StepProfiler(profile_dir, profile_steps)
    with _StopOnSignal() as stop, tqdm(total=cfg.max_steps, initial=step, desc="train",
                                       dynamic_ncols=True) as bar:
        try:
            while step < cfg.max_steps:
                x, y = put(data.get_batch(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, step))
                profiler.before_step(step)
                params, opt_state, metrics = train_step(params, opt_state, x, y)
                profiler.after_step(step, metrics)
                pending.append((step, metrics))
                step += 1
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
        text = generate_from_params(model, params, prepared.tokenizer, prompt="",
                                    max_new_tokens=80, context=cfg.seq_len,
                                    rng=jax.random.PRNGKey(cfg.seed))
        print("sample:\n" + text)
    return result


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace, dict]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m microgpt.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset)
    p.add_argument("--model-d", type=int, default=defaults.model_d)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--vocab", type=int, default=defaults.vocab, help="BPE vocabulary size")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--kernels", choices=KERNELS, default=defaults.kernels)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a .txt file, a folder of .txt files, or a .jsonl/.parquet file")
    src.add_argument("--dataset", help="a Hugging Face dataset name (needs the `data` extra)")
    p.add_argument("--text-field", default=defaults.text_field)
    p.add_argument("--out", help="run folder (default: runs/run-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: newest)")
    p.add_argument("--profile-dir", help="write a jax.profiler trace here (e.g. profiles/NAME)")
    p.add_argument("--profile-steps", default="20:25", help="START:STOP, the steps to trace")
    args = p.parse_args(argv)
    try:
        args.profile_steps = parse_steps(args.profile_steps)
    except ValueError as err:
        p.error(str(err))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    explicit = {k: v for k, v in values.items() if v != p.get_default(k)}
    for name, positive in [("batch_size", 1), ("seq_len", 2), ("max_steps", 1), ("eval_every", 1),
                           ("eval_batches", 1), ("log_every", 1), ("model_d", 2), ("heads", 1)]:
        if values[name] < positive:
            p.error(f"--{name.replace('_', '-')} must be at least {positive}")
    if values["model_d"] % values["heads"]:
        p.error(f"--model-d={values['model_d']} is not divisible by --heads={values['heads']}")
    return TrainConfig(**values), args, explicit


def main(argv=None) -> int:
    cfg, args, explicit = parse_args(argv)
    try:
        result = train(cfg, out=args.out, resume=args.resume, explicit=explicit,
                       profile_dir=args.profile_dir, profile_steps=args.profile_steps)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return {"finished": 0, "interrupted": 130, "nan": 1}[result.stopped]


if __name__ == "__main__":
    sys.exit(main())
