"""The trainer: exact resume after Ctrl-C, NaN stop, data-parallel and fsdp = single device,
checkpoints that move between device counts, CLI errors."""
import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from microgpt import checkpoint, data, sharding, train
from microgpt.gpt import micro_gpt_1

TINY = dict(preset="micro_gpt_1", model_d=32, heads=2, vocab=300, batch_size=8, seq_len=16,
            max_steps=12, eval_every=6, eval_batches=2, log_every=2, warmup_steps=3,
            peak_lr=1e-2)


def run(corpus, out, **overrides):
    cfg = train.TrainConfig(**{**TINY, "data": corpus, **overrides})
    return train.train(cfg, out=str(out), sample=False)


def test_training_lowers_val_loss_and_checkpoints(corpus, tmp_path):
    result = run(corpus, tmp_path / "run")
    assert result.stopped == "finished" and result.step == 12
    assert result.val_losses[12] < result.val_losses[0] - 0.5, result.val_losses
    assert sorted(result.losses) == list(range(12))
    step, meta = checkpoint.restore_meta(tmp_path / "run")
    assert step == 12 and meta["data_position"] == {"seed": 0, "next_step": 12}
    assert (tmp_path / "run" / "tokenizer.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run").iterdir())


def test_document_mask_trains_and_is_recorded(corpus, tmp_path):
    """--document-mask: the run learns, and its checkpoint (and so a resume) keeps the setting."""
    result = run(corpus, tmp_path / "run", document_mask=True, max_steps=6, eval_every=6)
    assert result.stopped == "finished" and result.val_losses[6] < result.val_losses[0]
    assert checkpoint.restore_meta(tmp_path / "run")[1]["config"]["document_mask"] is True
    cfg, _, explicit = train.parse_args(["--document-mask", "--data", corpus])
    assert cfg.document_mask and explicit["document_mask"] is True
    assert not train.parse_args(["--data", corpus])[0].document_mask


def test_resume_after_ctrl_c_gives_the_same_losses(corpus, tmp_path, monkeypatch):
    straight = run(corpus, tmp_path / "straight")

    get_batch = data.get_batch

    def interrupt_at_7(tokens, batch_size, seq_len, seed, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught between steps
        return get_batch(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(data, "get_batch", interrupt_at_7)
    first = run(corpus, tmp_path / "split")
    assert first.stopped == "interrupted" and first.step == 8
    assert checkpoint.latest_step(tmp_path / "split") == 8
    monkeypatch.setattr(data, "get_batch", get_batch)

    second = train.train(train.TrainConfig(), out=str(tmp_path / "split"), resume=True, sample=False)
    assert second.stopped == "finished" and second.step == 12
    resumed = {**first.losses, **second.losses}
    assert sorted(resumed) == sorted(straight.losses)
    np.testing.assert_allclose([resumed[s] for s in range(12)],
                               [straight.losses[s] for s in range(12)], rtol=1e-6)
    np.testing.assert_allclose(second.val_losses[12], straight.val_losses[12], rtol=1e-6)


def test_resume_refuses_conflicting_flags(corpus, tmp_path):
    run(corpus, tmp_path / "run", max_steps=2, eval_every=2)
    with pytest.raises(train.RunError, match="seq-len"):
        train.train(train.TrainConfig(), out=str(tmp_path / "run"), resume=True,
                    explicit={"seq_len": 32}, sample=False)


def test_new_run_refuses_to_overwrite(corpus, tmp_path):
    run(corpus, tmp_path / "run", max_steps=2, eval_every=2)
    with pytest.raises(train.RunError, match="--resume"):
        run(corpus, tmp_path / "run", max_steps=2, eval_every=2)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    make = train.make_train_step

    def poisoned(model, optimizer, mesh, shard):
        step = make(model, optimizer, mesh, shard)
        calls = iter(range(10**6))

        def wrapped(params, opt_state, x, y):
            params, opt_state, metrics = step(params, opt_state, x, y)
            if next(calls) >= 8:
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            return params, opt_state, metrics
        return wrapped

    monkeypatch.setattr(train, "make_train_step", poisoned)
    result = run(corpus, tmp_path / "run")
    assert result.stopped == "nan"
    assert checkpoint.latest_step(tmp_path / "run") == 6   # the last one saved before the NaN
    assert max(result.losses) < 8


def compare_layouts(shard: str, count: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(losses and gradient norms of 3 steps on one device, the same on `count` devices with the
    parameters held as `shard` says, the share of the state a device holds there)."""
    gpt = micro_gpt_1(vocab=64, model_d=32, num_heads=2)
    cfg = train.TrainConfig(max_steps=10)
    optimizer, _ = train.make_optimizer(cfg)
    rng = np.random.default_rng(1)
    x, y = (rng.integers(0, 64, (8, 16)).astype(np.int32) for _ in range(2))
    results, held = [], []
    for devices, layout in ((jax.devices()[:1], "replicate"), (jax.devices()[:count], shard)):
        mesh = train.data_mesh(devices)
        params = gpt.get_params(0)
        params = jax.device_put(params, sharding.shardings(params, layout, mesh))
        state = jax.jit(optimizer.init)(params)
        batch = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y)]
        step = train.make_train_step(gpt, optimizer, mesh, layout)
        history = []
        for _ in range(3):
            params, state, metrics = step(params, state, *batch)
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        results.append(np.array(history))
        held.append(sharding.bytes_per_device((params, state)))
        assert float(train.make_eval_loss(gpt, mesh, layout)(params, *batch)) > 0
    return results[0], results[1], held[1] / held[0]


@pytest.mark.parametrize("shard", ["replicate", "fsdp"])
def test_sharded_steps_equal_single_device(shard):
    """The step on 4 devices, parameters and AdamW state replicated or split (fsdp), against one
    device: the same losses and gradient norms; with fsdp each device holds a quarter."""
    assert jax.device_count() >= 4, "tests/conftest.py asks for 4 CPU devices"
    one, four, share = compare_layouts(shard, 4)
    # Per-device bf16 partial sums round differently from the whole batch's: equal to rounding.
    np.testing.assert_allclose(four, one, rtol=1e-4)
    # Every array of the tiny model splits 4 ways, but AdamW's step counts.
    assert share == (pytest.approx(1 / 4, rel=0.01) if shard == "fsdp" else 1)


EIGHT_DEVICES = """
import numpy as np
from tests.test_train import compare_layouts
one, eight, share = compare_layouts("fsdp", 8)
np.testing.assert_allclose(eight, one, rtol=1e-4)
print("SHARE", share)
"""


def child_env(devices: int) -> dict:
    """The environment of a child Python with `devices` CPU devices that imports the project:
    this process's XLA flags (conftest's too: LLVM's optimizations off) but the device count."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def test_fsdp_on_8_devices_equals_one_and_holds_an_eighth():
    """In a process of 8 CPU devices (the tests' own have 4): fsdp's steps as one device's."""
    env = child_env(8)
    out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("SHARE ")[1].split()[0]) == pytest.approx(1 / 8, rel=0.02)


def test_fsdp_splits_the_longest_axis_the_device_count_divides():
    assert sharding.spec((9000, 512), "fsdp", 8) == P("data", None)
    assert sharding.spec((50257, 768), "fsdp", 8) == P(None, "data")   # 50257 is odd
    assert sharding.spec((512, 2048), "fsdp", 8) == P(None, "data")
    assert sharding.spec((2048, 512), "fsdp", 4) == P("data", None)
    assert sharding.spec((30, 7), "fsdp", 4) == P()     # no axis divides: whole everywhere
    assert sharding.spec((), "fsdp", 4) == P()
    assert sharding.spec((512, 512), "replicate", 8) == P()
    with pytest.raises(ValueError, match="shard"):
        sharding.spec((8,), "zero3", 2)


RESUME_SCRIPT = """
import sys
from microgpt import train
cfg = train.TrainConfig()
result = train.train(cfg, out=sys.argv[1], resume=True, resume_step=6,
                     explicit={"shard": sys.argv[2]}, sample=False)
print("LOSSES", [result.losses[s] for s in sorted(result.losses)])
"""


def test_a_checkpoint_of_4_devices_resumes_on_1_2_and_8_in_either_layout(corpus, tmp_path,
                                                                          monkeypatch):
    """Saved at step 6 by fsdp on 4 devices; resumed from it on 1 device (replicated), on 2
    (fsdp), and in a process of 8 devices (replicated and fsdp): the next losses as the run's own."""
    straight = run(corpus, tmp_path / "run", shard="fsdp")
    want = [straight.losses[s] for s in range(6, 12)]
    for count, layout in ((1, "replicate"), (2, "fsdp")):
        folder = tmp_path / f"on{count}"
        shutil.copytree(tmp_path / "run", folder)
        monkeypatch.setattr(train, "data_mesh", lambda: Mesh(np.array(jax.devices()[:count]),
                                                             ("data",)))
        resumed = train.train(train.TrainConfig(), out=str(folder), resume=True, resume_step=6,
                              explicit={"shard": layout}, sample=False)
        np.testing.assert_allclose([resumed.losses[s] for s in range(6, 12)], want, rtol=1e-4)
    env = child_env(8)
    for layout in ("replicate", "fsdp"):
        folder = tmp_path / f"on8{layout}"
        shutil.copytree(tmp_path / "run", folder)
        out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(folder), layout], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "8 device(s)" in out.stdout
        losses = ast.literal_eval(out.stdout.split("LOSSES ")[1].splitlines()[0])
        np.testing.assert_allclose(losses, want, rtol=1e-4)


TWO_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")   # collectives across processes
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from microgpt import train
cfg = train.TrainConfig(**eval(sys.argv[3]))
result = train.train(cfg, out=sys.argv[4], sample=False)
print("LOSSES", [result.losses[s] for s in sorted(result.losses)], jax.process_count(),
      jax.device_count())
"""


def test_two_processes_of_two_devices_train_as_one_process_of_four(corpus, tmp_path):
    """The README's several-hosts recipe on this machine: jax.distributed with its coordinator
    on 127.0.0.1, two processes of 2 CPU devices each feeding its rows of every global batch
    (and fsdp across them): the losses of one process on 4 devices."""
    config = {**TINY, "data": corpus, "max_steps": 4, "eval_every": 4, "shard": "fsdp"}
    want = run(corpus, tmp_path / "one", **{k: v for k, v in config.items() if k != "data"})
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = child_env(2)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, f"127.0.0.1:{port}",
                               str(i), repr(config), str(tmp_path / "two")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        losses, processes, devices = out.split("LOSSES ")[1].splitlines()[0].rsplit(" ", 2)
        assert (int(processes), int(devices)) == (2, 4)
        np.testing.assert_allclose(ast.literal_eval(losses.strip()),
                                   [want.losses[s] for s in range(4)], rtol=1e-4)
    assert checkpoint.latest_step(tmp_path / "two") == 4


def test_cli_errors(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model-d", "30", "--heads", "4"])
    assert "divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "--dataset", "y"])
    code = train.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    code = train.main(["--data", corpus, "--vocab", "300", "--seq-len", "5000", "--batch-size", "4",
                       "--out", str(tmp_path / "r2")])
    assert code == 2 and "seq_len" in capsys.readouterr().err   # the corpus is shorter than that


def test_pallas_training_curve_matches_reference(corpus, tmp_path):
    """Same seed and data: per-step losses within bf16 noise, final val loss within 1%, and the
    curves drawn (bench/train_curves.py, which the GPU runs at micro_gpt_4 size). On CPU the kernels
    run in interpret mode; head_dim 64 and d = 128 fit their constraints."""
    from bench.train_curves import compare

    cfg = train.TrainConfig(**{**TINY, "data": corpus, "model_d": 128, "heads": 2, "seq_len": 32,
                               "batch_size": 4, "max_steps": 6, "eval_every": 6, "log_every": 1})
    summary = compare(cfg, ["reference", "pallas"], tmp_path)
    pallas = summary["paths"]["pallas"]
    assert pallas["stopped"] == "finished" and sorted(pallas["losses"]) == list(range(6))
    assert pallas["max_rel_step_diff"] <= 5e-3, pallas["losses"]
    assert abs(pallas["final_val_ratio"] - 1) <= 0.01
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.restore_meta(tmp_path / "pallas")[1]["kernels"] == "pallas"


# ------------------------------------------------------------------ run folders and the command line

def test_run_folder_works_wherever_it_is_moved(corpus, tmp_path, monkeypatch):
    """A run trained from one directory with a relative --data, moved elsewhere, generates and
    resumes from a third directory (its tokenizer and data are found from the folder itself)."""
    from microgpt import generate
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path)
    assert train.main(["--data", "corpus.txt", "--out", "first/run", *_tiny_flags()]) == 0
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "first" / "run").rename(moved)
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")
    assert generate.main(["--ckpt", str(moved), "--prompt", "the", "--max-new-tokens", "3"]) == 0
    assert train.main(["--resume", "--out", str(moved), "--max-steps", "8"]) == 0
    assert checkpoint.latest_step(moved) == 8
    assert checkpoint.restore_meta(moved)[1]["tokenizer"] == "tokenizer.json"


def _tiny_flags(**changes) -> list[str]:
    """TINY as command-line flags (the trainer's own defaults for the rest)."""
    flags = {"preset": "micro_gpt_1", "model-d": 32, "heads": 2, "vocab": 300, "batch-size": 8,
             "seq-len": 16, "max-steps": 4, "eval-every": 4, "eval-batches": 1, **changes}
    return [f for k, v in flags.items() for f in (f"--{k}", str(v))]


def test_gpt2_small_takes_its_own_shape_where_no_flag_is_given(corpus, tmp_path, capsys,
                                                               monkeypatch):
    """--preset gpt2_small: d 768, 12 heads, vocabulary 50257, seq-len 1024 unless a flag says
    otherwise (the other presets keep the trainer's defaults). A run of it, narrowed by flags, says
    that the small corpus gave fewer tokens than the 50257 asked (it stops there: compiling 12
    blocks would take the suite 10 s more)."""
    cfg, _, explicit = train.parse_args(["--preset", "gpt2_small"])
    assert (cfg.model_d, cfg.heads, cfg.vocab, cfg.seq_len) == (768, 12, 50257, 1024)
    assert explicit == {"preset": "gpt2_small"} and cfg == train.TrainConfig.for_preset("gpt2_small")
    cfg = train.parse_args(["--preset", "micro_gpt_4"])[0]
    assert (cfg.model_d, cfg.heads, cfg.vocab, cfg.seq_len) == (128, 4, 9000, 128)
    cfg, args, explicit = train.parse_args([
        "--preset", "gpt2_small", "--model-d", "32", "--heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--data", corpus, "--out", str(tmp_path / "run")])
    assert (cfg.model_d, cfg.heads, cfg.vocab, cfg.seq_len) == (32, 2, 50257, 16)

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(train, "_train", stop)
    with pytest.raises(Stop):
        train.train(cfg, out=args.out, explicit=explicit, sample=False)
    assert ("note: the tokenizer has 307 tokens, fewer than the 50257 of --vocab"
            in capsys.readouterr().out)


def test_ctrl_c_on_an_eval_step_saves_once(corpus, tmp_path, monkeypatch):
    get_batch = data.get_batch

    def interrupt_at_5(tokens, batch_size, seq_len, seed, step):
        if step == 5:   # after this step, step 6 is an eval step: it saves, and so does Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return get_batch(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(data, "get_batch", interrupt_at_5)
    result = run(corpus, tmp_path / "run")
    assert result.stopped == "interrupted" and result.step == 6
    assert checkpoint.steps(tmp_path / "run") == [6]


def test_ctrl_c_during_the_sample_and_a_second_ctrl_c_end_in_one_line(corpus, tmp_path,
                                                                       monkeypatch, capsys):
    from microgpt import generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "generate_from_params", interrupted)
    assert train.main(["--data", corpus, "--out", str(tmp_path / "run"), *_tiny_flags()]) == 130
    out = capsys.readouterr().out
    assert "interrupted during the sample; the run is complete, saved at step 4" in out
    assert checkpoint.latest_step(tmp_path / "run") == 4
    monkeypatch.setattr(train, "_train", interrupted)   # the second Ctrl-C, mid-run
    assert train.main(["--data", corpus, "--out", str(tmp_path / "run2"), *_tiny_flags()]) == 130
    assert capsys.readouterr().err.strip() == "aborted"


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_readers_never_create_folders(tmp_path, monkeypatch, capsys):
    from microgpt import generate
    missing = tmp_path / "no-such-run"
    assert train.main(["--resume", "--out", str(missing)]) == 2
    _one_line_error(capsys, "holds no run")
    assert generate.main(["--ckpt", str(missing)]) == 2
    _one_line_error(capsys, "holds no run")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume"]) == 2
    _one_line_error(capsys, "no trained run under")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate the data files", "delete a metadata file"])
def test_damaged_checkpoint_names_the_newest_intact_one(corpus, tmp_path, capsys, damage):
    from microgpt import generate
    run_dir = tmp_path / "run"
    run(corpus, run_dir)                                   # checkpoints at steps 6 and 12
    capsys.readouterr()
    step_dir = run_dir / "checkpoints" / "12"
    if damage == "truncate the data files":   # orbax's arrays (ocdbt's d/ folders)
        for victim in (p for p in (step_dir / "state").rglob("d/*") if p.is_file()):
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        next(p for p in (step_dir / "state").rglob("*") if p.name == "_METADATA").unlink()
    assert generate.main(["--ckpt", str(run_dir), "--max-new-tokens", "2"]) == 2
    _one_line_error(capsys, "checkpoint step 12", "is damaged", "step 6 is intact: pass --step 6")
    assert train.main(["--resume", "--out", str(run_dir)]) == 2
    _one_line_error(capsys, "checkpoint step 12", "step 6 is intact")
    assert generate.main(["--ckpt", str(run_dir), "--step", "6", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    # Resuming from step 6 sets step 12 aside (kept, not deleted) and trains to 12 again.
    assert train.main(["--resume", "--out", str(run_dir), "--step", "6"]) == 0
    assert checkpoint.steps(run_dir) == [6, 12] and (run_dir / "set-aside" / "12").is_dir()


def test_memory_estimate_refuses_a_run_that_cannot_fit(corpus, tmp_path, capsys):
    assert train.main(["--data", corpus, "--vocab", "300", "--seq-len", "100000",
                       "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "--seq-len 100000 with --batch-size 16 needs at least", "TB",
                    "attention probabilities [4, 4, 100000, 100000]", "--kernels pallas")   # 4 devices
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(corpus, tmp_path, monkeypatch):
    def broken(*args):
        def step(*args):
            raise RuntimeError("compilation failed")
        return step
    monkeypatch.setattr(train, "make_train_step", broken)
    with pytest.raises(RuntimeError, match="compilation failed"):
        run(corpus, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_extends_max_steps_keeping_the_schedule(corpus, tmp_path, capsys):
    """--resume --max-steps N past the stored end trains on; the cosine keeps the stored run's
    length (the new steps run at end_lr) unless --decay-steps is given."""
    run(corpus, tmp_path / "run", max_steps=6, eval_every=6)
    cfg, args, explicit = train.parse_args(["--resume", "--out", str(tmp_path / "run"),
                                            "--max-steps", "10"])
    result = train.train(cfg, out=args.out, resume=True, explicit=explicit, sample=False)
    assert result.stopped == "finished" and result.step == 10
    stored = train.TrainConfig(**checkpoint.restore_meta(tmp_path / "run")[1]["config"])
    assert (stored.max_steps, stored.decay_steps) == (10, 6)
    _, schedule = train.make_optimizer(stored)
    assert float(schedule(8)) == pytest.approx(stored.end_lr)
    assert "--max-steps: 6 -> 10" in capsys.readouterr().out
    with pytest.raises(train.RunError, match="the run is at step 10; --max-steps=8"):
        train.train(cfg, out=args.out, resume=True, explicit={"max_steps": 8}, sample=False)


def test_resume_reports_every_explicit_flag_that_differs_defaults_too(corpus, tmp_path):
    run(corpus, tmp_path / "run", max_steps=2, eval_every=2)   # model_d 32
    cfg, args, explicit = train.parse_args(["--resume", "--out", str(tmp_path / "run"),
                                            "--model-d", "128", "--seed", "0"])
    assert explicit == {"model_d": 128, "seed": 0}                 # 128 and 0 are the defaults
    with pytest.raises(train.RunError, match=r"--model-d=128 \(the checkpoint has 32\)"):
        train.train(cfg, out=args.out, resume=True, explicit=explicit, sample=False)


def test_help_shows_every_default_once(capsys):
    """Each option's help names its default exactly once (none for a switch or an option whose
    absence means something its help says)."""
    from microgpt.cli import DefaultsHelpFormatter
    parser = train._parser()
    formatter = DefaultsHelpFormatter("prog")
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.count("default") <= 1, text
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, action.dest
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: 128)" in out and "(default: 0)" in out
