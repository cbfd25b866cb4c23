"""Row positions: what the job tracks rows by.

Kept apart from the model code (it imports no torch), so that its actor starts in a moment
rather than after the seconds a torch import takes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


class Numberer:
    """Gives each input row its position (`input_row`) and drops the rows already done.

    Ray Data has no row index, so one actor counts rows as blocks arrive; the job runs with
    `preserve_order` and gives this actor one block at a time (Ray Data lets an actor run its
    queued tasks out of order), so the count is the row's position in read order, the same
    on every run over the same input.
    An actor that Ray restarted (its node was lost) would count from 0 again, so it refuses
    to work: the job fails, and a rerun resumes, rather than misnumber rows."""

    def __init__(self, done: Any):
        import ray

        self.done = ray.get(done) if isinstance(done, ray.ObjectRef) else done  # bool [rows done so far]
        self.next = 0
        self.restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.restarted:
            raise RuntimeError("the row-numbering actor was restarted and cannot know the rows' positions; "
                               "rerun the job to resume")
        n = batch.num_rows
        rows = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        batch = set_column(batch, "input_row", pa.array(rows))
        inside = rows < len(self.done)
        skip = np.zeros(n, bool)
        skip[inside] = self.done[rows[inside]]
        return batch.filter(pa.array(~skip)) if skip.any() else batch


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """`table` with column `name` replaced, or appended when it has none."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
