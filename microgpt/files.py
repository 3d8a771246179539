"""Files written whole or not at all: each goes to a temporary name beside its final one and is
renamed into place when complete (a rename within a directory is atomic), so an interrupted
write leaves the previous file, or none, never half of one."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix; the parent folder made) to write to, renamed
    to `path` when the block ends without an exception and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Replaces the contents of `path` with `text`, atomically."""
    with replaced_on_success(path) as tmp:
        tmp.write_text(text)
