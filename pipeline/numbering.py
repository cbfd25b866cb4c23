"""Row numbers: what the job tracks rows by; and the flag that stops a run early.

Kept apart from the model code (it imports no torch), so that its actor starts in a moment
rather than after the seconds a torch import takes.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from . import schema as col
from .workarounds import kv_delete, kv_get, kv_put

PLAN, DONE = "plan.arrow", "done.npy"


class RunFiles:
    """A folder of the driver's, for this run only, with what the numbering actor reads: the
    plan and the rows already done. The actor runs on the driver's node, so local files reach
    it without a copy in Ray's object store for the job's whole length."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vlm-pruner-run-")
        self.stop = StopFlag.of(self.dir)

    def write(self, plan: pa.Table, done: np.ndarray) -> None:
        feather.write_feather(plan, os.path.join(self.dir, PLAN))
        np.save(os.path.join(self.dir, DONE), done)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.stop.clear()

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StopFlag:
    """Set by the driver on Ctrl-C, read by the stages before each batch, on any node: a key in
    Ray's cluster-wide key-value store (one small request a batch)."""

    def __init__(self, run: str):
        self.key = f"vlm-pruner-stop-{run}".encode()

    @classmethod
    def of(cls, run_dir: str) -> StopFlag:
        """The flag of the run whose `RunFiles` are in `run_dir`."""
        return cls(os.path.basename(run_dir))

    def set(self) -> None:
        kv_put(self.key, b"1")

    def is_set(self) -> bool:
        return kv_get(self.key) is not None

    def clear(self) -> None:
        kv_delete(self.key)


class Numberer:
    """Gives each input row its `input_row`, `source_file` and `source_row`, and drops the rows
    already done (and, once the run is asked to stop, every row).

    Ray Data has no row index, so one actor counts rows as blocks arrive: the job runs with
    `preserve_order` and gives this actor one block at a time (Ray Data lets an actor run its
    queued tasks out of order), so the count is the row's position in the read, and the
    plan's files were read in the plan's order. The plan maps that position to the file and
    the number the file's rows keep from run to run (`pipeline.inputs`).
    An actor that Ray restarted (its node was lost) would count from 0 again, so it refuses
    to work: the job fails, and a rerun resumes, rather than misnumber rows."""

    def __init__(self, run_dir: str):
        import ray

        plan = feather.read_table(os.path.join(run_dir, PLAN))
        self.names = plan.column("name").combine_chunks()  # [files]
        self.starts = plan.column("start").to_numpy()  # [files] read position of each file's first row
        self.first_rows = plan.column("first_row").to_numpy()  # [files]
        self.done = np.load(os.path.join(run_dir, DONE))  # bool [rows done so far]
        self.stop = StopFlag.of(run_dir)
        self.next = 0
        self.restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.restarted:
            raise RuntimeError("the row-numbering actor was restarted and cannot know the rows' positions; "
                               "rerun the job to resume")
        n = batch.num_rows
        read = np.arange(self.next, self.next + n, dtype=np.int64)  # [n] positions in the read
        self.next += n
        file = np.searchsorted(self.starts, read, side="right") - 1  # [n] index into the plan's files
        source_row = read - self.starts[file]
        rows = self.first_rows[file] + source_row
        batch = set_column(batch, col.INPUT_ROW, pa.array(rows))
        batch = set_column(batch, col.SOURCE_FILE, self.names.take(pa.array(file)))
        batch = set_column(batch, col.SOURCE_ROW, pa.array(source_row))
        if self.stop.is_set():
            return batch.slice(0, 0)
        inside = rows < len(self.done)
        skip = np.zeros(n, bool)
        skip[inside] = self.done[rows[inside]]
        return batch.filter(pa.array(~skip)) if skip.any() else batch


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """`table` with column `name` replaced, or appended when it has none."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
