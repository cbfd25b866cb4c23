"""Helpers several parts of the pipeline use: the error for bad arguments, a filesystem for
any path or URI, an exception as the one line that goes into a row's `error` or a command's
error message, and the one definition of "% saved".

Torch-free, like `output` and `numbering`: the light Ray workers (numbering, writing)
import only these, and start in a fraction of a second instead of ~5 s."""
from __future__ import annotations

import posixpath

import pyarrow.fs as pafs


class JobError(ValueError):
    """Bad arguments: reported as one line, exit status 2, before any work starts."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path (made absolute) or any URI
    that pyarrow knows (s3://, gs://, hdfs://, file://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def glob_root(uri: str) -> str:
    """The folder part of a path before any glob character (the path itself without one)."""
    cut = min((uri.index(c) for c in "*?[" if c in uri), default=None)
    return uri if cut is None else posixpath.dirname(uri[:cut])


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def saved_pct(cost: float, baseline: float) -> float | None:
    """How much less `cost` is than `baseline`, in % (None without a baseline)."""
    return 100 * (1 - cost / baseline) if baseline else None
