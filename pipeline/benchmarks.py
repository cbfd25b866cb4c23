"""What `jobs/benchmark.py` needs from the pipeline: the `pipeline` and `resume`
measurements, the demo scenes the runtime benchmark runs on, and writing its report to any
folder or URI."""
from __future__ import annotations

import io
import json
import posixpath
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import filesystem


def bench_pipeline(rows: int, batch_size: int, max_new_tokens: int, output: str,
                   threads_per_actor: int | None = None) -> dict:
    """Rows/s of the caption job (Ray Data) on the demo data vs a plain Python loop calling
    PrunedVLM.generate on the same rows with the same batch size. The loop decodes images
    itself and its model is loaded before the clock starts; the job's time is its pipeline's
    (actor start-up and model load included, Ray's own start not)."""
    import pyarrow.parquet as pq
    import ray
    from PIL import Image

    from pruner import PrunedVLM

    from .demo import EVAL_PARQUET, MODEL_DIR
    from .job import JobConfig, actor_threads, run

    table = pq.read_table(EVAL_PARQUET).slice(0, rows).to_pylist()
    vlm = PrunedVLM.from_pretrained(str(MODEL_DIR), method="vlm-pruner", keep=64)
    start = time.perf_counter()
    for i in range(0, len(table), batch_size):
        chunk = table[i : i + batch_size]
        images = [Image.open(io.BytesIO(r["image"])) for r in chunk]
        vlm.generate(images, [r["question"] for r in chunk], max_new_tokens=max_new_tokens)
    loop = len(table) / (time.perf_counter() - start)
    cfg = JobConfig(output=output, limit=len(table), batch_size=batch_size, overwrite=True,
                    max_new_tokens=max_new_tokens, threads_per_actor=threads_per_actor)
    job = run(cfg)
    return {"rows": len(table), "batch_size": batch_size, "loop_rows_per_second": round(loop, 3),
            "job_rows_per_second": job["rows_per_second"], "job_over_loop": round(job["rows_per_second"] / loop, 3),
            "job_wall_seconds": job["wall_seconds"], "torch_threads": torch.get_num_threads(),
            "actor_threads": actor_threads(cfg, ray.cluster_resources()["CPU"])}


def bench_resume(rows: int, rows_per_file: int, output: str | None = None) -> dict:
    """The driver's resume bookkeeping and summary at `rows` finished rows (no model), measured
    in a fresh process so that its peak memory is this work's alone (`pipeline.scale`)."""
    from .scale import write_finished

    folder = output or tempfile.mkdtemp(prefix="resume-scale-")
    start = time.perf_counter()
    job_id = write_finished(folder, rows, rows_per_file)
    print(f"wrote {rows:,} finished rows in {time.perf_counter() - start:.0f} s to {folder}", file=sys.stderr)
    code = f"import json; from pipeline.scale import measure; print(json.dumps(measure({folder!r}, {job_id!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scene_images(n: int, seed: int = 0) -> list:
    """n distinct seeded synthetic scenes (the demo data's renderer)."""
    from .demo import scenes

    rng = random.Random(seed)
    return [scenes.render(scenes.sample_scene(rng)) for _ in range(n)]


def write_report(out: str, report: dict, text: str) -> None:
    """runtime.json and runtime.md under `out`, a local folder or a pyarrow URI (s3://...)."""
    fs, root = filesystem(out)
    fs.create_dir(root, recursive=True)
    for name, data in (("runtime.json", json.dumps(report, indent=1)), ("runtime.md", text)):
        with fs.open_output_stream(posixpath.join(root, name)) as f:
            f.write(data.encode())
