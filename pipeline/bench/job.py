"""What `jobs/benchmark.py` needs from the pipeline: the `pipeline` and `resume`
measurements, the demo scenes the runtime benchmark runs on, and writing its report to any
folder or URI."""
from __future__ import annotations

import io
import json
import os
import posixpath
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..common import filesystem


def bench_pipeline(rows: int, batch_size: int, max_new_tokens: int, output: str,
                   threads_per_actor: int | None = None, repeats: int = 3) -> dict:
    """The caption job (Ray Data) against a plain loop over the same model, rows, batch size
    and budget: loop, job, loop, job, ..., loop, each job from a cold start. Each job run is
    compared with the mean of the loop runs just before and after it (`bracketed`): this
    machine's speed drifts by ~10 % over minutes, and a drift that one neighbour alone would
    charge to the job, or credit it with, cancels out to first order.

    The loop loads the model, then decodes and preprocesses each batch inline and calls
    `PrunedVLM.generate`, as a user's ten lines would. Two ratios: rows/s over pipeline time
    (the loop without its model load; the job from the start of its pipeline, model actors'
    start-up and load included, Ray's own start not), and wall time with everything (the
    loop's model load; the job's `ray.init`, actor start-up and model load)."""
    import pyarrow.parquet as pq

    from ..demo import EVAL_PARQUET

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    table = pq.read_table(EVAL_PARQUET).slice(0, rows).to_pylist()
    loops = [_loop(table, batch_size, max_new_tokens)]
    rounds = []
    for _ in range(repeats):
        job = _job(len(table), batch_size, max_new_tokens, output, threads_per_actor)
        loops.append(_loop(table, batch_size, max_new_tokens))
        rounds.append(bracketed(len(table), loops[-2], loops[-1], job))
    threads = job["actor_threads"]
    return {"rows": len(table), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "torch_threads": torch.get_num_threads(), "actor_threads": threads,
            **{f"{key}_median": _median([r[key] for r in rounds]) for key in ("rows_per_second_ratio", "wall_ratio")},
            **{f"{key}_spread": [min(r[key] for r in rounds), max(r[key] for r in rounds)]
               for key in ("rows_per_second_ratio", "wall_ratio")},
            "rounds": rounds}


def bracketed(rows: int, before: dict, after: dict, job: dict) -> dict:
    """One round: a job run against the mean of the loop runs around it (seconds and wall)."""
    summary = job["summary"]
    loop_seconds, loop_wall = (before["seconds"] + after["seconds"]) / 2, (before["wall"] + after["wall"]) / 2
    return {"loop_seconds": [round(before["seconds"], 2), round(after["seconds"], 2)],
            "loop_rows_per_second": round(rows / loop_seconds, 3), "loop_wall_seconds": round(loop_wall, 2),
            "job_rows_per_second": summary["rows_per_second"], "job_pipeline_seconds": summary["wall_seconds"],
            "job_wall_seconds": round(job["wall"], 2),
            "rows_per_second_ratio": round(summary["rows_per_second"] * loop_seconds / rows, 3),
            "wall_ratio": round(loop_wall / job["wall"], 3),
            "seconds": summary["seconds"], "bound_by": summary["bound_by"]}


def _loop(table: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    """A user's loop: load the model, then decode, preprocess and generate batch by batch."""
    from PIL import Image

    from pruner import PrunedVLM

    from ..demo import MODEL_DIR

    start = time.perf_counter()
    vlm = PrunedVLM.from_pretrained(str(MODEL_DIR), method="vlm-pruner", keep=64)
    loaded = time.perf_counter()
    for i in range(0, len(table), batch_size):
        chunk = table[i : i + batch_size]
        images = [Image.open(io.BytesIO(r["image"])) for r in chunk]
        vlm.generate(images, [r["question"] for r in chunk], max_new_tokens=max_new_tokens)
    end = time.perf_counter()
    return {"seconds": end - loaded, "wall": end - start}


def _job(rows: int, batch_size: int, max_new_tokens: int, output: str, threads_per_actor: int | None,
         compile: str = "auto") -> dict:
    """The caption job on the same rows from a cold Ray start (`--overwrite`)."""
    import ray

    from ..job import JobConfig, actor_threads, run

    cfg = JobConfig(output=output, limit=rows, batch_size=batch_size, overwrite=True,
                    max_new_tokens=max_new_tokens, threads_per_actor=threads_per_actor, compile=compile)
    start = time.perf_counter()
    ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        summary = run(cfg)
        threads = actor_threads(cfg, ray.cluster_resources()["CPU"])
    finally:
        ray.shutdown()
    return {"summary": summary, "actor_threads": threads, "wall": time.perf_counter() - start}


def bench_compile(rows: int, batch_size: int, max_new_tokens: int, output: str, modes: list[str],
                  repeats: int = 3) -> dict:
    """The caption job (demo data and model, VLM-Pruner keep 64) with each `--compile` mode,
    side by side: rounds of one cold-start run a mode, in turn, so that the machine's drift
    falls on every mode alike. Per mode: rows/s over pipeline time (the model actor's
    start-up, load and compile included, Ray's own start not), wall seconds, and the
    actor's compile seconds; per round, each mode's rows/s over the first mode's."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            job = _job(rows, batch_size, max_new_tokens, output, None, compile=mode)
            summary = job["summary"]
            runs[mode].append({"rows_per_second": summary["rows_per_second"], "wall": round(job["wall"], 2),
                               "compile_seconds": summary["seconds"]["model_compile"],
                               "model_busy": summary["seconds"]["model_busy"]})
            print(f"--compile {mode}: {summary['rows_per_second']:.2f} rows/s, compile "
                  f"{summary['seconds']['model_compile']:.1f} s", file=sys.stderr, flush=True)
    first = runs[modes[0]]
    out = {"rows": rows, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "modes": {}}
    for mode, rs in runs.items():
        rps = [r["rows_per_second"] for r in rs]
        ratio = [r["rows_per_second"] / f["rows_per_second"] for r, f in zip(rs, first)]
        out["modes"][mode] = {"rows_per_second_median": _median(rps), "rows_per_second_spread": [min(rps), max(rps)],
                              f"vs_{modes[0]}_median": round(_median(ratio), 3),
                              f"vs_{modes[0]}_spread": [round(min(ratio), 3), round(max(ratio), 3)], "runs": rs}
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def bench_resume(rows: int, rows_per_file: int, output: str | None = None) -> dict:
    """The driver's resume bookkeeping and summary at `rows` finished rows (no model), measured
    in a fresh process so that its peak memory is this work's alone (`pipeline.bench.scale`)."""
    from .scale import write_finished

    folder = output or tempfile.mkdtemp(prefix="resume-scale-")
    start = time.perf_counter()
    job_id = write_finished(folder, rows, rows_per_file)
    print(f"wrote {rows:,} finished rows in {time.perf_counter() - start:.0f} s to {folder}", file=sys.stderr)
    code = f"import json; from pipeline.bench.scale import measure; print(json.dumps(measure({folder!r}, {job_id!r}, {rows})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_read(rows: int, fmt: str, rows_per_file: int, output: str | None = None) -> dict:
    """Reading a corpus of `rows` small images (no model), measured in a fresh process so that
    the driver's peak memory is this work's alone (`pipeline.bench.scale`)."""
    from .scale import write_corpus

    folder = output or tempfile.mkdtemp(prefix=f"read-{fmt}-")
    if not os.path.exists(folder) or not os.listdir(folder):
        start = time.perf_counter()
        write_corpus(folder, rows, fmt, rows_per_file)
        print(f"wrote {rows:,} rows as {fmt} in {time.perf_counter() - start:.0f} s to {folder}", file=sys.stderr)
    code = f"import json; from pipeline.bench.scale import measure_read; print(json.dumps(measure_read({folder!r}, {rows})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return {"format": fmt, **json.loads(proc.stdout.strip().splitlines()[-1])}


def load_model(shape: str | None, layers: int | None, model: str | None, dtype: str | None, device: str | None,
               seed: int, random_features: bool) -> tuple[torch.nn.Module, object, str]:
    """(model, processor, name) for the runtime benchmark: random weights at `shape`'s widths
    with the LLM cut to `layers`, or the checkpoint `model` (default: the demo model) as
    PrunedVLM.from_pretrained loads it; `random_features`: random outputs in place of the tower."""
    from transformers import AutoProcessor

    from pruner import PrunedVLM
    from .profiling import random_model, random_vision_tower, shape_processor
    from pruner.vlm import placement

    from ..demo import MODEL_DIR

    device, dtype = placement(device, dtype and getattr(torch, dtype))
    if shape:
        processor = shape_processor(shape) or AutoProcessor.from_pretrained(MODEL_DIR)
        net = random_model(shape, layers, processor, dtype, device, seed)
        name = f"random {shape} widths, LLM cut to {net.config.text_config.num_hidden_layers} layers"
    else:
        vlm = PrunedVLM.from_pretrained(model or str(MODEL_DIR), method="none", dtype=dtype, device=device)
        net, processor, name = vlm.model, vlm.preprocessor.processor, model or f"demo model ({MODEL_DIR})"
    tower = random_vision_tower(net, seed) if random_features else net
    return tower, processor, name + (", random features for the vision tower" if random_features else "")


def scene_images(n: int, seed: int = 0) -> list:
    """n distinct seeded synthetic scenes (the demo data's renderer)."""
    from ..demo import scenes

    rng = random.Random(seed)
    return [scenes.render(scenes.sample_scene(rng)) for _ in range(n)]


def write_report(out: str, report: dict, text: str) -> None:
    """runtime.json and runtime.md under `out`, a local folder or a pyarrow URI (s3://...)."""
    fs, root = filesystem(out)
    fs.create_dir(root, recursive=True)
    for name, data in (("runtime.json", json.dumps(report, indent=1)), ("runtime.md", text)):
        with fs.open_output_stream(posixpath.join(root, name)) as f:
            f.write(data.encode())
