"""What an output directory already holds, so a rerun skips finished rows.

Ray Data's own checkpointing (`DataContext.checkpoint_config`) filters rows at the read
operator by an id column of the *input*; this job's ids may be derived from content, and
`--limit` must pick the same first rows on every run before finished ones are skipped, so
the filter runs after ids are assigned instead. Files a killed run left half-written are
moved aside into `_partial/` with a non-Parquet suffix, where no reader looks.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARTIAL_DIR = "_partial"


@dataclass
class OutputState:
    ids: set[str]
    files: list[str]
    moved_aside: list[str]


def scan(output: str) -> OutputState:
    """Ids in the readable Parquet files of `output`; unreadable files are moved aside."""
    fs, root = _fs(output)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return OutputState(set(), [], [])
    ids: set[str] = set()
    files, moved = [], []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(info.path, columns=["id"], filesystem=fs)
        except (pa.ArrowException, OSError, KeyError):
            fs.create_dir(posixpath.join(root, PARTIAL_DIR), recursive=True)
            aside = posixpath.join(root, PARTIAL_DIR, info.base_name + ".partial")
            fs.move(info.path, aside)
            moved.append(aside)
            continue
        ids.update(table.column("id").to_pylist())
        files.append(info.path)
    return OutputState(ids, files, moved)


def read_rows(output: str, files: list[str], columns: list[str] | None = None) -> pa.Table:
    fs, _ = _fs(output)
    tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)
