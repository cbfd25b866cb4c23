"""The output folder: the record of one job configuration, holding only what the job wrote.

    _job.json                             manifest: job id, the answer-deciding configuration,
                                          the model's fingerprint, how many runs wrote here,
                                          the input files met (`pipeline.manifest`)
    _job.lock                             while a run holds the folder: host, pid, heartbeat
    _summary.json                         written at the end of every run
    labels-<job id>-r<run>-<...>.parquet  the rows, one per input row (columns: `pipeline.schema`)
    _partial/                             this job's files that a killed run left unreadable

Every other file is the user's: never read as output, moved or deleted. Rows are tracked by
their number in the input (`input_row`, see `pipeline.inputs`), not by id, so ids may
repeat. Ray Data's own checkpointing filters by an id column of the input at the read; here
`--limit` must pick the same first rows on every run and error rows are rerun, so the filter
is our own.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from . import schema as col
from .common import JobError, filesystem, first_line, glob_root

MANIFEST = "_job.json"
LOCK = "_job.lock"
SUMMARY = "_summary.json"
PARTIAL_DIR = "_partial"
PREFIX = "labels-"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0  # a hold from another host with no heartbeat for this long is taken over


class Folder:
    """An output folder on any pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = filesystem(uri)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise JobError(f"--output {uri}: {first_line(e)}") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def check(self, input_uri: str) -> None:
        """Fail with one line when the folder is unusable or overlaps the input."""
        if overlaps(self.uri, input_uri):
            raise JobError(f"--output {self.uri} overlaps the input {input_uri}: choose a folder outside it "
                           f"(the job never writes next to its input)")
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise JobError(f"--output {self.uri} is a file, not a folder")
        if self.local:  # the nearest folder that exists must be one we can write in
            existing = self.root
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise JobError(f"--output {self.uri} cannot be created: {existing} is a file")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise JobError(f"--output {self.uri} cannot be created or written: {existing} is not writable")

    def create(self) -> None:
        try:
            self.fs.create_dir(self.root, recursive=True)
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"--output {self.uri} cannot be created: {first_line(e)}") from None

    def names(self) -> list[str]:
        """Top-level file names."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return []
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.root))
                      if i.type == pafs.FileType.File)

    def own_files(self, job_id: str) -> list[str]:
        return [self.path(n) for n in self.names() if is_own(n, job_id)]

    def foreign(self, job_id: str | None) -> list[str]:
        mine = {MANIFEST, LOCK, SUMMARY}
        return [n for n in self.names() if n not in mine and not (job_id and is_own(n, job_id))
                and not is_temp(n)]

    def read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError, pa.ArrowException):
            return None

    def write_json(self, name: str, obj: dict) -> None:
        """Written whole or not at all: to a temporary name, then moved over."""
        tmp = self.path(f"_tmp-{uuid.uuid4().hex[:8]}-{name}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=1).encode())
        self.fs.move(tmp, self.path(name))

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass


def is_temp(name: str) -> bool:
    """One of the job's own temporary names (`_tmp-<8 hex>-...`), never a user's `_tmp-x`."""
    return re.match(r"_tmp-(stale-)?[0-9a-f]{8}[-.]", name) is not None


def is_own(name: str, job_id: str) -> bool:
    """Exactly the names `FileNames` gives: a user's `labels-<job>-... (copy).parquet` is not."""
    return re.fullmatch(rf"{PREFIX}{re.escape(job_id)}-r\d{{4,}}-[0-9a-f]+-\d{{6,}}(-\d+)?\.parquet", name) is not None


def overlaps(output: str, input_uri: str) -> bool:
    """Whether one contains the other, compared as resolved locations: `file://`, relative
    paths, `..`, symlinks and trailing slashes all name the same place."""
    a, b = _resolved(output), _resolved(glob_root(input_uri))
    if a[0] != b[0]:
        return False
    sep = os.sep if a[0] == "local" else "/"
    return a[1] == b[1] or b[1].startswith(a[1].rstrip(sep) + sep) or a[1].startswith(b[1].rstrip(sep) + sep)


def _resolved(uri: str) -> tuple[str, str]:
    """(scheme, normalised path); a local path resolved through symlinks."""
    uri = uri.removeprefix("file://")
    if "://" in uri:
        scheme, path = uri.split("://", 1)
        return scheme, posixpath.normpath(path)
    return "local", os.path.realpath(os.path.expanduser(uri))


def file_prefix(job_id: str, run: int) -> str:
    return f"{PREFIX}{job_id}-r{run:04d}-"


class FileNames(FilenameProvider):
    """Ray Data names output files `labels-<job id>-r<run>-<write>-<task>.parquet`: the job's own
    pattern. Here, not in `job`, so that the writing workers import nothing heavy."""

    def __init__(self, prefix: str):
        super().__init__(file_format="parquet")
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}{write_uuid}-{task_index:06}.parquet"


def run_of(path: str) -> int:
    m = re.search(r"-r(\d+)-", posixpath.basename(path))
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------------- one writer at a time


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(hold: dict) -> bool:
    if hold.get("host") == socket.gethostname():
        pid = int(hold.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        started = hold.get("pid_started")
        return started is None or _process_start(pid) in (None, started)
    return time.time() - float(hold.get("heartbeat", 0)) < STALE_SECONDS


class Lock:
    """`_job.lock`: held by one run at a time. A hold whose process is gone (same host), or
    whose heartbeat stopped (another host: a lost driver node), is stale and taken over."""

    def __init__(self, folder: Folder):
        self.folder = folder
        self.path = folder.path(LOCK)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                   "since": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise JobError when a live run holds the folder (without taking it)."""
        hold = self.folder.read_json(LOCK)
        if hold is not None and _alive(hold):
            raise JobError(self._held(hold))

    def _held(self, hold: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(hold.get("since", 0))))
        return (f"{self.folder.uri} is held by a running job: pid {hold.get('pid')} on {hold.get('host')}, "
                f"since {since}; wait for it, or use another --output")

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            hold = self.folder.read_json(LOCK)
            if hold is None:  # released, or being written this instant
                time.sleep(0.2)
                continue
            if _alive(hold):
                raise JobError(self._held(hold))
            self._take_over()
        raise JobError(f"{self.folder.uri}: could not take {LOCK}; is another job starting there?")

    def _create(self) -> bool:
        data = json.dumps({**self.me, "heartbeat": time.time()}).encode()
        if self.folder.local:  # atomic: exactly one creator wins
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.folder.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.folder.fs.open_output_stream(self.path) as f:  # object stores: write, then check we won
            f.write(data)
        time.sleep(0.5)
        return (self.folder.read_json(LOCK) or {}).get("token") == self.me["token"]

    def _take_over(self) -> None:
        aside = self.folder.path(f"_tmp-stale-{uuid.uuid4().hex[:8]}.lock")
        try:
            self.folder.fs.move(self.path, aside)  # only one taker's move succeeds locally
        except (FileNotFoundError, OSError):
            return
        self.folder.delete(aside)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if (self.folder.read_json(LOCK) or {}).get("token") != self.me["token"]:
                    return  # taken over: stop touching it
                self.folder.write_json(LOCK, {**self.me, "heartbeat": time.time()})
            except (OSError, pa.ArrowException):
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.folder.read_json(LOCK) or {}).get("token") == self.me["token"]:
            self.folder.delete(self.path)

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- what the folder holds


@dataclass
class Done:
    """Input rows (by position) that already have an output row, after any error rows to be
    retried were removed."""

    rows: np.ndarray  # bool [max input_row + 1]
    count: int
    retried: int  # error rows removed so that this run does them again
    moved_aside: list[str] = field(default_factory=list)

    def in_scope(self, scope: np.ndarray | None) -> int:
        """Rows done among those `scope` selects (bool by input_row; None: all)."""
        if scope is None:
            return self.count
        n = min(len(scope), len(self.rows))
        return int((self.rows[:n] & scope[:n]).sum())


def own_tables(folder: Folder, files: list[str], columns: list[str] | None) -> Iterator[tuple[str, pa.Table]]:
    """Each file's table. A file still being written (no footer yet) is skipped: its rows are
    not done. Any other file that cannot be read is an error that names it, never a silent
    undercount."""
    for path in files:
        try:
            pq.read_metadata(path, filesystem=folder.fs)
        except (pa.ArrowException, OSError):
            continue
        try:
            table = pq.read_table(path, columns=columns, filesystem=folder.fs)
        except (pa.ArrowException, OSError) as e:
            raise JobError(f"{path} cannot be read as this job's output: {first_line(e)}") from None
        yield path, table


def set_aside_unreadable(folder: Folder, job_id: str) -> list[str]:
    """Own files a killed run left half-written move to `_partial/` with a non-Parquet suffix,
    where no reader looks; their rows are simply done again."""
    moved = []
    for path in folder.own_files(job_id):
        try:
            pq.read_metadata(path, filesystem=folder.fs)
        except (pa.ArrowException, OSError):
            folder.fs.create_dir(folder.path(PARTIAL_DIR), recursive=True)
            aside = folder.path(posixpath.join(PARTIAL_DIR, posixpath.basename(path) + ".partial"))
            folder.fs.move(path, aside)
            moved.append(aside)
    return moved


def prepare_resume(folder: Folder, job_id: str, scope: np.ndarray | None, retry_errors: bool) -> Done:
    """What this run may skip. With `retry_errors`, error rows this run reads (`scope`, bool by
    input_row; None: every row) are removed from their files first (each file rewritten to a
    temporary name and moved over the original), so that the folder never holds two rows for
    one input row, even if this run is killed half-way: a removed row is simply not done yet."""
    moved = set_aside_unreadable(folder, job_id)
    rows_seen: list[np.ndarray] = []
    retried = 0
    for path, table in own_tables(folder, folder.own_files(job_id), [col.INPUT_ROW, col.ERROR]):
        rows = table.column(col.INPUT_ROW).to_numpy()
        if retry_errors:
            drop = pc.is_valid(table.column(col.ERROR)).to_numpy(zero_copy_only=False)
            if scope is not None:
                read = np.zeros_like(drop)
                read[rows < len(scope)] = scope[rows[rows < len(scope)]]
                drop &= read
            if drop.any():
                retried += int(drop.sum())
                _rewrite_without(folder, path, drop)
                rows = rows[~drop]
        rows_seen.append(rows)
    everything = np.concatenate(rows_seen) if rows_seen else np.zeros(0, np.int64)
    done = np.zeros(int(everything.max()) + 1 if everything.size else 0, bool)
    done[everything] = True
    return Done(done, int(done.sum()), retried, moved)


def _rewrite_without(folder: Folder, path: str, drop: np.ndarray) -> None:
    if drop.all():
        folder.delete(path)
        return
    table = pq.read_table(path, filesystem=folder.fs)
    tmp = folder.path(f"_tmp-{uuid.uuid4().hex[:8]}.parquet")
    pq.write_table(table.filter(pa.array(~drop)), tmp, filesystem=folder.fs)
    folder.fs.move(tmp, path)


def clear(folder: Folder, job_id: str | None) -> None:
    """--overwrite: delete what this job wrote (never another file)."""
    if job_id:
        for path in folder.own_files(job_id):
            folder.delete(path)
        partial = folder.path(PARTIAL_DIR)
        if folder.fs.get_file_info(partial).type == pafs.FileType.Directory:
            for info in folder.fs.get_file_info(pafs.FileSelector(partial)):
                if is_own(info.base_name.removesuffix(".partial"), job_id):
                    folder.delete(info.path)
    if job_id:  # without a manifest, a `_summary.json` there is not known to be ours
        folder.delete(folder.path(SUMMARY))
        folder.delete(folder.path(MANIFEST))
    for name in folder.names():
        if is_temp(name):
            folder.delete(folder.path(name))


@dataclass
class Totals:
    """The folder's rows in figures, read file by file so that memory stays bounded."""

    rows: int = 0
    errors: int = 0
    processed: int = 0  # rows written by the given run
    errors_this_run: int = 0
    repeated_ids: int = 0  # rows minus distinct ids
    duplicate_rows: int = 0  # input positions with more than one row (never expected)
    kept_sum: int = 0
    ok: int = 0
    model_seconds: float = 0.0  # this run's rows: model actor time
    preprocess_seconds: float = 0.0  # this run's rows: preprocessing CPU time
    flops: int = 0
    flops_unpruned: int = 0


def totals(folder: Folder, job_id: str, run: int) -> Totals:
    t = Totals()
    ids = []  # per file: 64-bit hashes of the ids
    seen = np.zeros(0, bool)  # input positions with a row
    cols = [col.INPUT_ROW, col.ID, col.ERROR, col.IMAGE_TOKENS_KEPT, col.FLOPS_TOTAL, col.FLOPS_TOTAL_UNPRUNED,
            col.SECONDS, col.PREPROCESS_SECONDS]
    for path, table in own_tables(folder, folder.own_files(job_id), cols):
        err = pc.is_valid(table.column(col.ERROR))
        n_err = int(pc.sum(err).as_py() or 0)
        t.rows += table.num_rows
        t.errors += n_err
        if run_of(path) == run:
            t.processed += table.num_rows
            t.errors_this_run += n_err
            t.model_seconds += float(pc.sum(table.column(col.SECONDS)).as_py() or 0)
            t.preprocess_seconds += float(pc.sum(table.column(col.PREPROCESS_SECONDS)).as_py() or 0)
        ok = table.filter(pc.invert(err))
        t.ok += ok.num_rows
        for name, attr in ((col.IMAGE_TOKENS_KEPT, "kept_sum"), (col.FLOPS_TOTAL, "flops"),
                           (col.FLOPS_TOTAL_UNPRUNED, "flops_unpruned")):
            setattr(t, attr, getattr(t, attr) + int(pc.sum(ok.column(name)).as_py() or 0))
        # ids as 64-bit hashes: 8 bytes a row instead of the strings (a collision among 10M ids
        # has a chance of about 3e-6, and would only undercount repeats by one)
        ids.append(np.fromiter(map(hash, table.column(col.ID).to_pylist()), np.int64, table.num_rows))
        rows = table.column(col.INPUT_ROW).to_numpy()
        if rows.size and rows.max() >= seen.size:
            seen = np.concatenate([seen, np.zeros(max(int(rows.max()) + 1 - seen.size, seen.size), bool)])
        unique = np.unique(rows)
        t.duplicate_rows += int(rows.size - unique.size + seen[unique].sum())
        seen[unique] = True
    if ids:
        hashes = np.concatenate(ids)
        del ids
        hashes.sort()
        t.repeated_ids = t.rows - (int(np.count_nonzero(hashes[1:] != hashes[:-1])) + 1 if hashes.size else 0)
    return t
