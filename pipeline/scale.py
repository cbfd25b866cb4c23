"""What resuming costs the driver at cluster scale, measured without a model.

`write_finished` fills an output folder with N finished rows (the job's own file names and
manifest, every column the summary totals); `measure` then does what a rerun's driver does
before and after the pipeline (set aside unreadable files, build the done set, write it for
the numbering actor, total the summary), checks that it counted every row written, and
reports seconds and peak memory. Run it in a fresh process (`python jobs/benchmark.py
resume`), so that the peak is this work's alone.
"""
from __future__ import annotations

import resource
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import output
from .numbering import RunFiles


def write_finished(folder_uri: str, rows: int, rows_per_file: int, error_every: int = 1000) -> str:
    """N finished rows in files of `rows_per_file`; every `error_every`-th is an error row.
    Returns the job id written to the manifest."""
    folder = output.Folder(folder_uri)
    folder.create()
    job_id = uuid.uuid4().hex[:12]
    folder.write_json(output.MANIFEST, {"version": 1, "job_id": job_id, "runs": 1, "config": {}})
    names = output.FileNames(output.file_prefix(job_id, 1))
    write = uuid.uuid4().hex
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        row = np.arange(start, start + n, dtype=np.int64)
        error = pa.array(np.where(row % error_every == 0, "cannot read image file", None), pa.string())
        ids = pa.array([f"{r:032x}" for r in row.tolist()], pa.string())
        flops = rng.integers(1 << 30, 1 << 32, n)
        table = pa.table({
            "id": ids, "input_row": row, "error": error,
            "image_tokens_kept": np.full(n, 64, np.int32),
            "flops_total": flops, "flops_total_unpruned": flops * 2,
            "seconds": np.full(n, 0.05), "preprocess_seconds": np.full(n, 0.01),
        })
        pq.write_table(table, folder.path(names.get_filename_for_task(write, i)), filesystem=folder.fs)
    return job_id


def measure(folder_uri: str, job_id: str, rows: int) -> dict:
    """Seconds and peak resident memory of a rerun's driver-side bookkeeping over `rows`
    finished rows; raises if it did not find every one of them."""
    folder = output.Folder(folder_uri)
    base = _peak_bytes()
    t0 = time.perf_counter()
    done = output.prepare_resume(folder, job_id, scope=None, retry_errors=False)
    t1 = time.perf_counter()
    with RunFiles() as files:  # as the job hands the done set to its numbering actor
        files.write(pa.table({"name": ["x"], "start": [0], "first_row": [0]}), done.rows)
    t2 = time.perf_counter()
    totals = output.totals(folder, job_id, run=1)
    t3 = time.perf_counter()
    if done.count != rows or totals.rows != rows or totals.processed != rows:
        raise RuntimeError(f"wrote {rows:,} rows but found {done.count:,} done and {totals.rows:,} in the summary")
    return {"rows": totals.rows, "files": len(folder.own_files(job_id)), "done_set_bytes": int(done.rows.nbytes),
            "resume_seconds": round(t1 - t0, 2), "ship_seconds": round(t2 - t1, 2),
            "summary_seconds": round(t3 - t2, 2), "seconds": round(t3 - t0, 2),
            "peak_rss_mib": round(_peak_bytes() / 2**20), "peak_rss_before_mib": round(base / 2**20)}


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
