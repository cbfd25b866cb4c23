"""Where each input row comes from, and the number (`input_row`) it keeps across runs.

The output folder's manifest records every input file the job has met: its name, size,
modification time, a fingerprint, its row count and the `input_row` of its first row. A run
reads the files the manifest knows first, in that order, then the new ones by name; a file
keeps its numbers for good, so a folder that gains files (whatever their names sort as) has
exactly the new rows answered, and a file that disappeared keeps its rows in the output.

A known file whose fingerprint changed is refused: its rows would be answered against other
content. The fingerprint hashes the size and the first and last 64 KiB of the file: all of
an image of up to 128 KiB, and a Parquet file's footer, which holds every column chunk's
offsets and statistics. It is recomputed only for a file whose size or modification time
changed, so a rerun over a million known files reads nothing but their listing.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from . import webdataset
from .common import JobError, first_line
from .sources import InputFile, Source

EDGE = 64 << 10  # bytes hashed at each end of a file
THREADS = 16  # files fingerprinted at once (remote stores answer slowly, one by one)


@dataclass
class InputPlan:
    """The files to read, in order, and where their rows are numbered."""

    files: list[InputFile]  # present files, in read order
    first_rows: np.ndarray  # int64 [files]: input_row of each file's first row
    record: list[dict]  # the manifest's `inputs`: every file ever met, present or not
    missing: list[str] = field(default_factory=list)  # known files no longer in the input

    @property
    def rows(self) -> np.ndarray:
        """int64 [files]; -1 for a stream, whose rows are known only once read."""
        return np.array([-1 if f.rows is None else f.rows for f in self.files], np.int64)

    @property
    def total(self) -> int | None:
        """Rows of the present files (None with a stream among them)."""
        return None if (self.rows < 0).any() else int(self.rows.sum())

    @property
    def end(self) -> int:
        """One past the largest input_row ever given (a stream's first row, for a stream)."""
        return max((r["first_row"] + (r["rows"] or 0) for r in self.record), default=0)

    def table(self) -> pa.Table:
        """What the numbering actor needs: each file's name, the read position of its first
        row, and that row's input_row."""
        starts = np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64) if self.files else []
        return pa.table({"name": pa.array([f.name for f in self.files], pa.string()),
                         "start": pa.array(starts, pa.int64()), "first_row": pa.array(self.first_rows, pa.int64())})

    def scope(self, limit: int | None) -> np.ndarray | None:
        """bool [end]: the input_rows of the first `limit` rows read (None: every row)."""
        if limit is None:
            return None
        mask = np.zeros(max(self.end, int(self.first_rows.max(initial=0)) + limit), bool)
        left = limit
        for first, n in zip(self.first_rows, self.rows):
            take = left if n < 0 else min(int(n), left)
            mask[first : first + take] = True
            left -= take
            if left == 0:
                break
        return mask


def plan_inputs(source: Source, known: list[dict] | None) -> InputPlan:
    """Order `source`'s files after the manifest's `known` ones and number the new ones.
    Raises JobError naming a known file whose content changed."""
    known = known or []
    by_name = {r["file"]: r for r in known}
    present = {f.name: f for f in source.files}
    stale = [f for f in source.files if not _unchanged(f, by_name.get(f.name))]
    for f in _measure(source.fs, stale, source.kind):
        present[f.name] = f
        r = by_name.get(f.name)
        if r is not None and r["fingerprint"] != f.fingerprint:
            raise JobError(f"input file {f.name} changed since this job answered it (size {r['size']:,} -> "
                           f"{f.size:,} bytes); pass --overwrite to start over, or restore the file")
    record, files, firsts = [], [], []
    for r in known:  # in first_row order: the order of the earlier runs
        f = present.pop(r["file"], None)
        if f is None:
            record.append(r)
            continue
        f = replace(f, rows=r["rows"], fingerprint=r["fingerprint"])
        record.append({**r, "size": f.size, "mtime_ns": f.mtime_ns})
        files.append(f)
        firsts.append(r["first_row"])
    end = max((r["first_row"] + (r["rows"] or 0) for r in known), default=0)
    for f in sorted(present.values(), key=lambda f: f.name):  # new files, after every known row
        record.append({"file": f.name, "size": f.size, "mtime_ns": f.mtime_ns, "fingerprint": f.fingerprint,
                       "rows": f.rows, "first_row": end})
        files.append(f)
        firsts.append(end)
        end += f.rows or 0  # a stream is a source's only file
    read = {f.name for f in files}
    missing = [r["file"] for r in known if r["file"] not in read]
    return InputPlan(files, np.array(firsts, np.int64), record, missing)


def _unchanged(f: InputFile, r: dict | None) -> bool:
    """Known with the same size and modification time: its recorded fingerprint stands."""
    if f.fingerprint is not None:
        return r is not None and r["fingerprint"] == f.fingerprint
    return r is not None and r["size"] == f.size and f.mtime_ns is not None and r.get("mtime_ns") == f.mtime_ns


def _measure(fs: pafs.FileSystem | None, files: list[InputFile], kind: str) -> list[InputFile]:
    """Each file with its fingerprint and row count: a Parquet footer's, a shard's samples
    (from its headers), else one row."""
    if fs is None or not files:
        return files

    def one(f: InputFile) -> InputFile:
        try:
            with fs.open_input_file(f.path) as stream:
                h = hashlib.sha256(f"{f.size}\0".encode())
                h.update(stream.read_at(min(EDGE, f.size), 0))
                tail = max(EDGE, f.size - EDGE)
                if f.size > tail:
                    h.update(stream.read_at(f.size - tail, tail))
                if kind == "parquet":
                    rows = pq.ParquetFile(stream).metadata.num_rows
                elif kind == "webdataset":
                    stream.seek(0)
                    rows = sum(1 for _ in webdataset.samples(stream, f.size, read_data=False))
                else:
                    rows = 1
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"input file {f.name} cannot be read: {first_line(e)}") from None
        return replace(f, rows=rows, fingerprint=f.fingerprint or h.hexdigest()[:32])  # the Hub's hash, if listed

    with ThreadPoolExecutor(THREADS) as pool:
        work = pool.map(one, files)
        return list(tqdm(work, total=len(files), desc="fingerprinting input files", unit="file",
                         disable=len(files) < 1000, mininterval=5))
