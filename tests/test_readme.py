"""The README's Python examples run as written (each in a fresh namespace)."""
import re
from pathlib import Path

from microgpt import train

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _example(needle: str) -> str:
    (found,) = [code for code in EXAMPLES if needle in code]
    return found


def test_every_example_is_checked_here():
    """Each example runs below, but the several-hosts one (jax.distributed.initialize() needs a
    cluster's environment)."""
    covered = ("micro_gpt_4(", "from kernels import", "generate_text(", "jax.distributed")
    assert sorted(EXAMPLES) == sorted(_example(n) for n in covered)


def test_the_original_api_example(capsys):
    namespace = {}
    exec(_example("micro_gpt_4("), namespace)
    assert capsys.readouterr().out.split() == ["17209344"]
    assert namespace["logits"].shape == (2, 64, 9000)


def test_the_kernels_example():
    namespace = {}
    exec(_example("from kernels import"), namespace)
    assert namespace["o"].shape == (2, 256, 4, 64) and namespace["y"].shape == (2, 256, 128)
    assert namespace["loss"].shape == () and float(namespace["loss"]) > 0


def test_the_generate_text_example(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)          # generate_text reads the newest run under ./runs
    cfg = train.TrainConfig(preset="micro_gpt_1", model_d=32, heads=2, vocab=300, batch_size=4,
                            seq_len=16, max_steps=2, eval_every=2, eval_batches=1, data=corpus)
    train.train(cfg, sample=False)
    capsys.readouterr()
    exec(_example("generate_text("), {})
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_the_readme_lists_the_shipped_tables_preferences():
    """README's copy of the implementation preferences is the shipped table's."""
    from kernels import tuning
    block = re.search(r"<!-- preferences: kernels.tuning.preferences_markdown\(\) -->\n(.*?)"
                      r"<!-- end of preferences -->", README, flags=re.S)
    assert block and block.group(1) == tuning.preferences_markdown()
