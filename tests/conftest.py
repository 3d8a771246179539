"""Tests see 4 CPU devices so data-parallel code is exercised here, and on a CPU-only host XLA
compiles without LLVM's optimizations (both set before jax is imported)."""
import importlib.util
import os
import tempfile


def _add_xla_flag(flag: str):
    name = flag.split("=")[0]
    if name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


_add_xla_flag("--xla_force_host_platform_device_count=4")
# On a host with no accelerator plugin, XLA compiles without LLVM's optimizations: the suite
# compiles hundreds of small programs (interpret-mode kernels above all) that each run briefly,
# and the trainer and model tests took 24% less time so (session 24). Never beside a GPU or TPU
# plugin, whose kernels the same flag would slow.
if importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None:
    _add_xla_flag("--xla_backend_optimization_level=0")
# The kernels read the shipped tuning table only, never a tuning cache of the machine's user.
os.environ["MICROGPT_TUNING"] = os.path.join(tempfile.mkdtemp(prefix="microgpt-tuning"),
                                             "tuning.json")


import numpy as np  # noqa: E402 - after XLA_FLAGS, like every import that may load jax
import pytest  # noqa: E402


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small text corpus (a .txt path) with its token cache under tmp_path."""
    monkeypatch.setenv("MICROGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog and then runs far away".split()
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session: many tests compile the same programs
    (a tiny model's train step, the kernels at one shape), each from fresh closures that jax's
    in-memory cache does not match; the persistent cache, keyed by the program, does (the trainer
    tests ran in half the time)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
