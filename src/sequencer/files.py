"""Files written whole: a temporary file beside the target, renamed over it once complete."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (with its suffix, which some writers read) for a writer that takes a path; it
    replaces `path` when the block ends without error, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        # mkstemp creates the file 0600: give it the mode open() would, so that others sharing the folder can read it.
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without error (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike, fields: Sequence[str] = ()) -> Path:
    """Dict rows as a CSV file written whole: the columns `fields` (default: the first row's keys), blank where a
    row has none."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields or rows[0]), restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as f:
        f.write(buffer.getvalue().encode())
    return Path(path)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain(value: Any) -> Any:
    """`value` with every tuple in it a list, however deep: what torch, JSON and YAML all store and read back as it
    is, so that a config or record written out compares equal to the file read back."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value
