"""The tuning tables: lookup by device kind, then architecture, then defaults; the user's cache
over the shipped table; a damaged cache ignored with one warning (devices faked); and the
default implementation following the table's preference."""
from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from bench import tune
from kernels import tuning
from kernels.attention import api as attention_api
from kernels.attention import mosaic_gpu
from kernels.layernorm_ffn import api as layernorm_ffn_api

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def on(monkeypatch, kind: str, arch: str | None, *tables):
    """Pretend the device is `kind` of architecture `arch`, with these (source, table) layers."""
    monkeypatch.setattr(tuning, "device_kind", lambda: kind)
    monkeypatch.setattr(tuning, "architecture", lambda: arch)
    monkeypatch.setattr(tuning, "_tables", lambda: tables)


def entries(**by_key):
    return {"toy/impl": by_key}


SHIPPED = {H100: {"toy/impl": {"d64": {"a": 1}}, "toy": {"d64": "impl"}},
           H200: {"toy/impl": {"d64_s1024": {"a": 2}}},
           "architectures": {"sm90": H100}}


def test_the_device_kind_first_then_the_architecture_then_the_defaults(monkeypatch):
    on(monkeypatch, H200, "sm90", ("shipped", SHIPPED))
    entry = tuning.lookup("toy", "impl", "d64_s1024")
    assert (entry.section, entry.matched, entry.values) == (H200, "d64_s1024", {"a": 2})
    # The H200's section has nothing at d64_s512: the architecture's device (the H100's) serves.
    entry = tuning.lookup("toy", "impl", "d64_s512")
    assert (entry.section, entry.matched, entry.values) == (f"sm90 ({H100})", "d64", {"a": 1})
    assert tuning.block_config("toy", "impl", "d64_s512", {"a": 0, "b": 0}) == {"a": 1, "b": 0}
    assert tuning.preferred_implementation("toy", "d64_s512") == "impl"
    # Another Hopper (an H100 PCIe) has no section: the architecture's.
    on(monkeypatch, "NVIDIA H100 PCIe", "sm90", ("shipped", SHIPPED))
    assert tuning.lookup("toy", "impl", "d64").values == {"a": 1}
    # Another architecture, or none: the defaults.
    on(monkeypatch, "NVIDIA A100-SXM4-80GB", "sm80", ("shipped", SHIPPED))
    entry = tuning.lookup("toy", "impl", "d64")
    assert (entry.source, entry.section, entry.values) == ("defaults", None, {})
    assert "the defaults" in entry.describe()
    assert tuning.preferred_implementation("toy", "d64") is None


def test_the_users_cache_over_the_shipped_table(monkeypatch):
    user = {H200: {"toy/impl": {"d64": {"a": 9}}}}
    on(monkeypatch, H200, "sm90", ("user cache", user), ("shipped", SHIPPED))
    entry = tuning.lookup("toy", "impl", "d64_s512")
    assert (entry.source, entry.section, entry.values) == ("user cache", H200, {"a": 9})
    # The shipped device entry is narrower, but an entry wins whole in the order of the sections:
    # the user's H200 entry ("d64") comes before the shipped H200 one ("d64_s1024").
    assert tuning.lookup("toy", "impl", "d64_s1024").values == {"a": 9}


def test_a_stale_entry_raises_naming_its_table(monkeypatch):
    """An entry that sets a parameter the kernels no longer take (a cache tuned before a rename,
    as session 26's dlogits_* -> probabilities_*) raises, naming the table and the parameter,
    rather than failing later in the configuration's constructor or being skipped."""
    user = {H200: {"toy/impl": {"d64": {"dlogits_block_m": 64}}}}
    on(monkeypatch, H200, "sm90", ("user cache /home/me/.cache/microgpt/tuning.json", user),
       ("shipped", SHIPPED))
    with pytest.raises(ValueError, match=r"user cache /home/me/.*'dlogits_block_m'.*bench/tune.py"):
        tuning.block_config("toy", "impl", "d64", {"a": 0})


def test_a_damaged_cache_warns_once_and_is_ignored(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("MICROGPT_TUNING", str(cache))
    cache.write_text('{"NVIDIA H200": {"toy/impl": ')            # cut off mid-write
    tuning.clear_cache()
    try:
        assert tuning.user_table_path() == cache
        tuning.lookup("attention", "triton", "d64")
        tuning.lookup("attention", "triton", "d128")
        err = capsys.readouterr().err
        assert err.count("warning: ignoring the tuning cache") == 1 and str(cache) in err
        cache.unlink()
        cache.mkdir()                                           # unreadable: a folder
        tuning.clear_cache()
        tuning.lookup("attention", "triton", "d64")
        assert "warning: ignoring the tuning cache" in capsys.readouterr().err
    finally:
        tuning.clear_cache()


def test_the_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROGPT_TUNING")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.user_table_path() == tmp_path / "microgpt" / "tuning.json"


def test_tune_writes_the_users_cache_by_default_atomically(tmp_path, monkeypatch):
    cache = tmp_path / "new" / "tuning.json"
    monkeypatch.setenv("MICROGPT_TUNING", str(cache))
    assert tune.parse_args([]).table == cache
    tuning.record(H200, "toy", "impl", "d64", {"a": 3}, cache)
    tuning.record_preferred(H200, "toy", "d64", "impl", cache)
    assert json.loads(cache.read_text()) == {H200: {"toy/impl": {"d64": {"a": 3}},
                                                    "toy": {"d64": "impl"}}}
    assert [p.name for p in cache.parent.iterdir()] == ["tuning.json"]   # no temporary left


def test_an_h200_gets_the_hoppers_fast_path_from_the_shipped_table(monkeypatch):
    """The shipped table on a device it has no section for, of architecture sm90: attention with
    implementation=None picks mosaic_gpu with the architecture's tiles, and says which entry."""
    shipped = tuning.read_table(tuning.TABLE_PATH)
    serving = shipped["architectures"]["sm90"]
    on(monkeypatch, "NVIDIA H800", "sm90", ("shipped", shipped))
    monkeypatch.setattr(attention_api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_api.mosaic_gpu, "on_sm90", lambda: True)
    q = jnp.zeros((1, 1024, 2, 64), jnp.bfloat16)
    assert attention_api.default_implementation(q) == shipped[serving]["attention"]["d64_s1024"]
    tuning.used_entries(clear=True)
    entry = tuning.lookup("attention", "mosaic_gpu", "d64_s1024")
    assert entry.section == f"sm90 ({serving})" and entry.source == "shipped"
    assert entry.values == tuning.layered_entry(shipped[serving]["attention/mosaic_gpu"],
                                                "d64_s1024")
    assert tuning.used_entries() == [entry]


@pytest.mark.parametrize("key", ["d128", "d128_s8192", "d64_s512"])
def test_lookup_layers_narrower_keys_within_the_entry(monkeypatch, key):
    table = {H100: entries(**{"*": {"a": 1}, "d128": {"b": 2}, "d128_s8192": {"b": 3}})}
    on(monkeypatch, H100, "sm90", ("shipped", table))
    want = {"d128": {"a": 1, "b": 2}, "d128_s8192": {"a": 1, "b": 3}, "d64_s512": {"a": 1}}[key]
    assert tuning.lookup("toy", "impl", key).values == want


@pytest.mark.parametrize("key, want", [
    ("d128_s8192_docs", {"a": 1, "b": 5, "c": 4}), ("d128_s1024_docs", {"a": 1, "b": 2, "c": 4}),
    ("d128_s8192", {"a": 1, "b": 3}), ("d64_s8192_docs", {"a": 1})])
def test_a_masks_tag_narrows_every_key_before_it(monkeypatch, key, want):
    """Packed documents ("_docs") take their own entries over the dense ones at every width."""
    table = {H100: entries(**{"*": {"a": 1}, "d128": {"b": 2}, "d128_s8192": {"b": 3},
                              "d128_docs": {"c": 4}, "d128_s8192_docs": {"b": 5}})}
    on(monkeypatch, H100, "sm90", ("shipped", table))
    assert tuning.lookup("toy", "impl", key).values == want


def test_attention_with_segment_ids_uses_the_documents_entries(monkeypatch):
    """The api looks segment ids up under "_docs" (falling back to the dense keys) and keeps the
    dense key without them; the README's preferences table sorts such keys."""
    on(monkeypatch, H100, "sm90",
       ("shipped", {H100: {"attention/triton": {"d64_docs": {"block_q": 16}}}}))
    q = jnp.ones((1, 32, 2, 64), jnp.bfloat16)
    ids = jnp.repeat(jnp.arange(4), 8)[None]
    for segment_ids, key, block_q in ((ids, "d64_s32_docs", 16), (None, "d64_s32", None)):
        tuning.used_entries(clear=True)
        attention_api.attention(q, q, q, segment_ids=segment_ids, implementation="triton")
        (entry,) = tuning.used_entries()
        assert (entry.shape_key, entry.values.get("block_q")) == (key, block_q)
    assert "d64_s32_docs" in tuning.preferences_markdown(
        {H100: {"attention": {"d64_s32_docs": "triton", "d64_s32": "triton", "d64": "triton"}}})


# (backend, Hopper, the tuning table's preference, dtype) -> the default implementation.
DEFAULT_CASES = [
    ("cpu", False, None, jnp.bfloat16, "triton"),
    ("tpu", False, "mosaic_gpu", jnp.bfloat16, "tpu"),
    ("gpu", False, "mosaic_gpu", jnp.bfloat16, "triton"),       # not a Hopper GPU
    ("gpu", True, None, jnp.bfloat16, "triton"),                # not measured here
    ("gpu", True, "triton", jnp.bfloat16, "triton"),            # measured slower
    ("gpu", True, "mosaic_gpu", jnp.float32, "triton"),         # wgmma would round f32 to tf32
    ("gpu", True, "mosaic_gpu", jnp.bfloat16, "mosaic_gpu"),
]


@pytest.mark.parametrize("backend, sm90, preferred, dtype, expected", DEFAULT_CASES)
def test_attention_default_follows_the_tuning_table(backend, sm90, preferred, dtype, expected,
                                                    monkeypatch):
    """implementation=None picks mosaic_gpu only on Hopper, for bf16, where bench/tune.py measured
    it faster at that head_dim and length."""
    monkeypatch.setattr(attention_api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(mosaic_gpu, "on_sm90", lambda: sm90)
    asked = []
    monkeypatch.setattr(attention_api.tuning, "preferred_implementation",
                        lambda op, key: asked.append((op, key)) or preferred)
    q = jnp.zeros((1, 16, 2, 128), dtype)
    assert attention_api.default_implementation(q) == expected
    assert asked in ([], [("attention", "d128_s16")])   # head_dim 128, length 16


@pytest.mark.parametrize("backend, sm90, preferred, dtype, expected", DEFAULT_CASES)
def test_layernorm_ffn_default_follows_the_tuning_table(backend, sm90, preferred, dtype, expected,
                                                        monkeypatch):
    """implementation=None picks mosaic_gpu only on Hopper, for bf16 x, where bench/tune.py
    measured it faster at that width."""
    monkeypatch.setattr(layernorm_ffn_api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(layernorm_ffn_api.warp_specialized, "on_sm90", lambda: sm90)
    asked = []
    monkeypatch.setattr(layernorm_ffn_api.tuning, "preferred_implementation",
                        lambda op, key: asked.append((op, key)) or preferred)
    x = jnp.zeros((16, 512), dtype)
    assert layernorm_ffn_api.default_implementation(x) == expected
    assert asked in ([], [("layernorm_ffn", "d512")])


@pytest.mark.parametrize("implementation, preferred, expected", [
    ("mosaic_gpu", "mosaic_gpu", "mosaic_gpu"), ("mosaic_gpu", "triton", "triton"),
    ("mosaic_gpu", None, "triton"),          # not measured: Triton's, which runs every head_dim
    ("triton", "mosaic_gpu", "triton"), ("tpu", None, "tpu")])
def test_attention_backward_follows_the_tuning_table(implementation, preferred, expected,
                                                     monkeypatch):
    """The Mosaic GPU forward's backward is the one bench/tune.py measured faster at that head_dim
    and length ("attention_backward"); every other forward takes its own."""
    asked = []
    monkeypatch.setattr(attention_api.tuning, "preferred_implementation",
                        lambda op, key: asked.append((op, key)) or preferred)
    assert attention_api.default_backward(implementation, 64, 1000) == expected
    assert asked in ([], [("attention_backward", "d64_s1024")])


@pytest.mark.parametrize("preferred", ["triton", "mosaic_gpu"])
def test_the_tuner_times_the_mosaic_gpu_forward_beside_either_backward(preferred, monkeypatch):
    """Where the table prefers Triton's backward (the H100's d64_s1024), the tuner's Mosaic GPU
    configuration goes to `attention` without its own backward's parameters, which Triton's
    backward would refuse (session 23: no candidate ran at d64_s512 and d64_s1024)."""
    monkeypatch.setattr(attention_api.tuning, "preferred_implementation",
                        lambda op, key: preferred)
    config = mosaic_gpu.DEFAULTS[64].flat()
    blocks = tune.attention_block_sizes("mosaic_gpu", None, tune.AttentionShape(16, 1024, 16, 64),
                                        config)
    forward = mosaic_gpu.DEFAULTS[64].names(("forward",))
    assert set(blocks) == (set(forward) if preferred == "triton" else set(config))
    forward_config, *_ = attention_api._kernels("mosaic_gpu", preferred, "d64_s1024", 64, blocks)
    assert forward_config == mosaic_gpu.DEFAULTS[64].forward
    with pytest.raises(ValueError, match="no tuning parameter 'dkdv_group_mib' with the triton"):
        attention_api._kernels("mosaic_gpu", "triton", "d64_s1024", 64, config)


@pytest.mark.parametrize("kind, arch, triton_up_to", [(H200, "sm90", 512),
                                                     ("NVIDIA H100 PCIe", "sm90", 1024)])
def test_the_shipped_table_picks_each_backward_where_it_measured_faster(kind, arch, triton_up_to,
                                                                        monkeypatch):
    """On the H200 (its own entries) and on a Hopper without any (the H100's): Triton's backward
    after the Mosaic GPU forward at head_dim 64 up to S512 (H200) or S1024 (H100), the Mosaic GPU
    one beyond and at 128."""
    on(monkeypatch, kind, arch, ("shipped", tuning.read_table(tuning.TABLE_PATH)))
    picks = {(d, s): attention_api.default_backward("mosaic_gpu", d, s)
             for d in (64, 128) for s in (512, 1024, 2048, 8192)}
    s1024 = "triton" if triton_up_to >= 1024 else "mosaic_gpu"
    assert picks == {(64, 512): "triton", (64, 1024): s1024, (64, 2048): "mosaic_gpu",
                     (64, 8192): "mosaic_gpu", **{(128, s): "mosaic_gpu"
                                                  for s in (512, 1024, 2048, 8192)}}
