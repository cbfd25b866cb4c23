"""What resuming and reading cost at cluster scale, measured without a model.

`write_finished` fills an output folder with N finished rows (the job's own file names and
manifest, every column the summary totals); `measure` then does what a rerun's driver does
before and after the pipeline (set aside unreadable files, build the done set, write it for
the numbering actor, total the summary), checks that it counted every row written, and
reports seconds and peak memory. `write_corpus` and `measure_read` do the same for reading a
corpus of small images (Parquet or WebDataset shards): rows/s and the driver's peak memory.
Run each in a fresh process (`python jobs/benchmark.py resume|read`), so that the peak is
this work's alone.
"""
from __future__ import annotations

import os
import resource
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import output
from .. import schema as col
from ..numbering import RunFiles


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
            col.ID: ids, col.INPUT_ROW: row, col.ERROR: error,
            col.IMAGE_TOKENS_KEPT: np.full(n, 64, np.int32),
            col.FLOPS_TOTAL: flops, col.FLOPS_TOTAL_UNPRUNED: flops * 2,
            col.SECONDS: np.full(n, 0.05), col.PREPROCESS_SECONDS: np.full(n, 0.01),
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


# ---------------------------------------------------------------------- reading a large corpus


def write_corpus(folder: str, rows: int, fmt: str, rows_per_file: int = 10_000) -> None:
    """`rows` small synthetic images (64x64 PNGs, 256 distinct ones) with a question each, as
    Parquet files or WebDataset shards (img2dataset's layout) of `rows_per_file` rows."""
    import io
    import json
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(256):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    os.makedirs(folder, exist_ok=True)
    for start in range(0, rows, rows_per_file):
        keys = [f"{i:09d}" for i in range(start, min(start + rows_per_file, rows))]
        name = os.path.join(folder, f"{start // rows_per_file:05d}")
        if fmt == "parquet":
            pq.write_table(pa.table({"key": keys, "image": [images[int(k) % 256] for k in keys],
                                     "question": ["What is shown?"] * len(keys)}), name + ".parquet")
            continue
        with tarfile.open(name + ".tar", "w") as tar:
            for k in keys:
                for ext, data in (("png", images[int(k) % 256]), ("json", json.dumps({"question": "What is shown?"}).encode())):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _decode_batch(batch: pa.Table) -> pa.Table:
    """Decode every image as the job does; one row of counts a batch, so that nothing but
    counts reaches the driver."""
    from ..images import decode, image_bytes

    decoded = pixels = 0
    for cell in batch.column("image").to_pylist():
        try:
            img = decode(image_bytes(cell))
        except ValueError:
            continue
        decoded += 1
        pixels += img.width * img.height
    return pa.table({"rows": [batch.num_rows], "decoded": [decoded], "pixels": [pixels]})


def check_read(rows: int, read: int, decoded: int) -> None:
    """Raise unless the read benchmark read and decoded every row it wrote: a rate over fewer
    rows would be a rate of other work."""
    if read != rows or decoded != rows:
        raise RuntimeError(f"wrote {rows:,} rows but read {read:,} and decoded {decoded:,}")


def measure_read(folder: str, rows: int) -> dict:
    """Rows/s of the job's reading path (list, plan, read, number, decode; no model) over a
    corpus of `rows` rows, and the driver's peak memory; raises unless every row was read and
    decoded."""
    import ray

    from ..inputs import plan_inputs
    from ..job import numbered_rows
    from ..sources import open_source

    base = _peak_bytes()
    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        t0 = time.perf_counter()
        source = open_source(folder)
        plan = plan_inputs(source, None)
        t1 = time.perf_counter()
        with RunFiles() as files:
            files.write(plan.table(), np.zeros(0, bool))
            ds = numbered_rows(source, plan, files.dir).map_batches(_decode_batch, batch_format="pyarrow")
            ds.context.enable_progress_bars = False
            got = ds.sum(["rows", "decoded"])
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    check_read(rows, got["sum(rows)"], got["sum(decoded)"])
    return {"rows": rows, "files": len(plan.files), "plan_seconds": round(t1 - t0, 2),
            "read_seconds": round(t2 - t1, 2), "rows_per_second": round(rows / (t2 - t1)),
            "driver_peak_rss_mib": round(_peak_bytes() / 2**20), "driver_rss_before_mib": round(base / 2**20)}
