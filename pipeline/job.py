"""The captioning / labeling job as a Ray Data pipeline:

read -> number rows, skip done ones -> ids, decode + preprocess -> model actors -> Parquet.

With GPUs, preprocessing runs in CPU workers ahead of the model actors; on CPUs, inside them.

Before any work the output folder is checked and locked, and its manifest compared with
this configuration (`pipeline.output` says what the folder holds, `pipeline.manifest` how
a configuration is recorded).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy

from . import output as out_
from .common import saved_pct
from .config import JobConfig, JobError
from .manifest import configuration, open_manifest, refuse_another, write_manifest
from .sources import Source, SourceError, open_source
from .inputs import InputPlan, plan_inputs
from .numbering import Numberer, RunFiles, StopFlag
from .progress import report_progress
from .schema import INPUT_ROW
from .stages import (COMPILE_SECONDS, RETRIED_PER_ROW, AnswerConfig, Answerer, Columns, PrepareConfig, Preparer,
                     Tally)
from .workarounds import write_seconds


def columns(cfg: JobConfig, source: Source) -> Columns:
    names = source.column_names()
    video = cfg.video_column or (source.video_column if cfg.image_column is None else None)
    image = None if video else cfg.image_column or source.image_column

    def need(flag: str, name: str) -> str:
        if name not in names:
            raise JobError(f"{flag} {name!r} is not a column of {cfg.input}; columns: {', '.join(names)}")
        return name

    if video:
        need("--video-column", video)
    else:
        need("--image-column", image)
    question = need("--question-column", cfg.question_column) if cfg.question_column else (
        "question" if "question" in names else None)
    id_col = need("--id-column", cfg.id_column) if cfg.id_column else ("id" if "id" in names else source.id_column)
    return Columns(image=image, video=video, question=question, id=id_col, default_question=cfg.question)


def run(cfg: JobConfig) -> dict:
    """Run the job to completion; returns (and writes) the summary. Raises JobError, before
    any work, for an unusable output folder, one that another run holds, one that holds
    another configuration, an input that does not have the columns asked for, or a known
    input file whose content changed. A first Ctrl-C stops taking rows and writes the rows
    in flight (the summary says `interrupted`); a second stops at once. The configuration is
    resolved (`JobConfig.resolved`) first: arguments the model refuses fail there."""
    cfg = cfg.resolved()
    folder = out_.Folder(cfg.output)
    folder.check(cfg.input)  # before Ray starts: nothing is written yet
    out_.Lock(folder).check()
    now = configuration(cfg)  # what the manifest records; it hashes the model's files, so once a run
    if not cfg.overwrite:
        refuse_another(folder, now)
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        source = open_source(cfg.input, cfg.split, cfg.revision)
    except SourceError as e:
        raise JobError(str(e)) from None
    cols = columns(cfg, source)
    folder.create()
    with out_.Lock(folder), RunFiles() as files:
        manifest = open_manifest(folder, now, cfg.overwrite)
        plan = plan_inputs(source, manifest.get("inputs"))
        manifest["inputs"] = plan.record
        scope = plan.scope(cfg.limit)
        done = out_.prepare_resume(folder, manifest["job_id"], scope, cfg.retry_errors)
        write_manifest(folder, manifest)
        files.write(plan.table(), done.rows)
        prefix = out_.file_prefix(manifest["job_id"], manifest["runs"])
        start = time.perf_counter()
        ds = pipeline(cfg, source, plan, cols, files.dir)
        to_do = None if plan.total is None else min(plan.total, cfg.limit or plan.total) - done.in_scope(scope)
        with stop_on_interrupt(files), report_progress(ds, total=to_do):
            ds.write_parquet(cfg.output, min_rows_per_file=cfg.rows_per_file,
                             filename_provider=out_.FileNames(prefix))
        wall = time.perf_counter() - start
        return write_summary(folder, cfg, manifest, done, wall, write_seconds(ds), scope=scope,
                             missing=plan.missing, interrupted=files.stop.is_set())


@contextlib.contextmanager
def stop_on_interrupt(files: RunFiles) -> Iterator[None]:
    """The first Ctrl-C stops the numbering and model actors taking new rows, so the pipeline
    drains: the rows answered are written. The second raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: Any) -> None:
        files.stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("interrupted: answering and writing the rows in flight (Ctrl-C again stops at once; "
              "those rows then run again on resume)", file=sys.stderr, flush=True)

    before = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def numbered_rows(source: Source, plan: InputPlan, run_dir: str, limit: int | None = None) -> ray.data.Dataset:
    """The input's rows in the plan's order with `input_row`, `source_file` and `source_row`,
    less those already done (the plan and the done set are `RunFiles` in `run_dir`)."""
    ds = source.read([f.path for f in plan.files])
    # In order: rows are numbered by position as they pass one actor, and --limit means the first
    # rows. On the dataset's own context: a dataset copies the current context when it is read,
    # so only its own context governs how it runs.
    ds.context.execution_options.preserve_order = True
    if limit is not None:
        ds = ds.limit(limit)
    # On the driver's node: a lost worker node must not take the row count with it. One block
    # at a time: Ray Data lets an actor run a later task first when an earlier one's input is
    # not ready yet, and the numbering must follow read order.
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return ds.map_batches(Numberer, batch_format="pyarrow", batch_size=None, num_cpus=0, label_selector=here,
                          compute=ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                          fn_constructor_kwargs={"run_dir": run_dir})


def pipeline(cfg: JobConfig, source: Source, plan: InputPlan, cols: Columns, run_dir: str) -> ray.data.Dataset:
    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cpus = ray.cluster_resources().get("CPU", 1)
    stop = StopFlag.of(run_dir)
    for name in (COMPILE_SECONDS, RETRIED_PER_ROW):
        Tally(cfg.output, name).take()  # none left over from a run that died before its summary
    ds = numbered_rows(source, plan, run_dir, cfg.limit)
    # One model batch per block, so preprocessing spreads over workers batch by batch and
    # answers stream to the writer as groups finish rather than when a whole input file is done.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    group = cfg.batch_size * cfg.group_batches  # rows an actor call regroups by prompt length
    prep, answer = PrepareConfig.of(cfg, cols, source.base_dir), AnswerConfig.of(cfg)
    if gpus > 0:
        # The GPU waits on CPU work: a pool of preprocessing workers that grows to the CPUs
        # the model actors leave (one kept for reading, numbering and writing).
        # Where no CPU is spare (a small cluster), the one worker reserves none: reserving a
        # whole CPU there left the read task without one, and the job waited forever.
        spare = int(cpus) - cfg.concurrency - 1
        ds = ds.map_batches(Preparer, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=int(spare >= 1),
                            compute=ActorPoolStrategy(min_size=1, max_size=max(1, spare)),
                            fn_constructor_kwargs={"cfg": prep})
        return ds.map_batches(Answerer, batch_size=group, batch_format="pyarrow", num_gpus=gpus,
                              num_cpus=model_actor_cpus(cpus, cfg.concurrency),
                              compute=ActorPoolStrategy(size=cfg.concurrency),
                              fn_constructor_kwargs={"cfg": answer, "stop": stop})
    # On CPUs the model's cores are the preprocessing cores, so each model actor preprocesses
    # its own batches: a separate stage only added a second start-up (~6 s of torch and
    # transformers imports), serialising tensors across processes, and contention.
    threads = actor_threads(cfg, cpus)
    return ds.map_batches(
        Answerer, batch_size=group, batch_format="pyarrow", compute=ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=model_actor_cpus(cpus, cfg.concurrency), runtime_env={"env_vars": cpu_actor_env(threads)},
        fn_constructor_kwargs={"cfg": answer, "threads": threads, "prepare": prep, "stop": stop})


# glibc's malloc returns every freed block above its mmap threshold (activations of a batch:
# tens of MB) to the kernel, so the next batch faults the same memory in again, page by page:
# 2.4 M minor faults and ~10 % of the model's time on 320 demo rows. With mmap off and no
# trimming, freed memory stays in the process for the next batch; peak RSS is unchanged (every
# batch reaches the same peak). Other C libraries ignore these variables.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def cpu_actor_env(threads: int) -> dict[str, str]:
    """Environment of a CPU model actor's process: its torch threads and malloc's reuse."""
    return {"OMP_NUM_THREADS": str(threads), **KEEP_FREED_MEMORY}


def model_actor_cpus(cpus: float, concurrency: int) -> float:
    """CPUs each model actor reserves. Ray Data's tasks (read, repartition, write) take whole
    CPUs, and Ray Data warns that the job "will hang" when it sees no CPU free, which it did
    at the end of a run while the model actor and the last write task still held all of a
    2-core node. Together the actors reserve half a CPU less than a whole number, so tasks
    can never fill the node, and tasks get at least one CPU (with whole-CPU actors,
    --concurrency 2 on 2 cores left the read task none). The reservation only places actors:
    a CPU model actor's threads are set by actor_threads."""
    whole = min(concurrency, max(int(cpus) - 1, 1))
    return (whole - 0.5) / concurrency


def actor_threads(cfg: JobConfig, cpus: float) -> int:
    """Torch threads of a CPU model actor. Ray sets OMP_NUM_THREADS to an actor's reserved CPUs
    (1 here, or less, so that reading and preprocessing are never starved), which left torch
    one thread on a node with more cores: the job ran at 0.47x a plain loop on 2 cores. The
    model is the work, so it gets the node's cores; the light CPU tasks share them."""
    if cfg.threads_per_actor is not None:
        return cfg.threads_per_actor
    return max(1, int(cpus) // cfg.concurrency)


def stage_seconds(t: out_.Totals, wall: float, actors: int, write: float | None) -> dict:
    """Where this run's time went: CPU-seconds of preprocessing, the model actors' busy and
    idle seconds (busy: on batches, with their own preprocessing on a CPU-only node; idle:
    starting up, loading the model, waiting for input), writing."""
    busy = t.model_seconds
    return {"wall": round(wall, 2), "preprocess_cpu": round(t.preprocess_seconds, 2), "model_busy": round(busy, 2),
            "model_idle": round(max(wall * actors - busy, 0.0), 2), "write": None if write is None else round(write, 2),
            "model_actors": actors}


def bound_by(seconds: dict) -> str:
    """One line on what bounded the run, for sizing actors and CPU workers."""
    wall, actors = seconds["wall"], seconds["model_actors"]
    if wall <= 0:
        return "nothing to do"
    busy = seconds["model_busy"] / (wall * actors)
    prep = seconds["preprocess_cpu"] / wall
    if busy >= 0.75:
        return f"bound by the model actor: busy {busy:.0%} of wall (more actors or GPUs would help)"
    if seconds["preprocess_cpu"] >= seconds["model_busy"]:
        return (f"bound by preprocessing: {seconds['preprocess_cpu']:.1f} CPU-s ({prep:.1f} cores on average) while "
                f"the model actor was busy {busy:.0%} of wall (more CPU workers would help)")
    return (f"bound by start-up and overhead: the model actor was busy {busy:.0%} of wall and idle "
            f"{seconds['model_idle']:.1f} s (a small run does not amortise Ray and model start-up)")


def write_summary(folder: out_.Folder, cfg: JobConfig, manifest: dict, done: out_.Done, wall: float,
                  write: float | None = None, scope: np.ndarray | None = None, missing: list[str] = (),
                  interrupted: bool = False) -> dict:
    """The final state of the folder, and what this run did."""
    t = out_.totals(folder, manifest["job_id"], manifest["runs"])
    seconds = stage_seconds(t, wall, cfg.concurrency, write)
    seconds["model_compile"] = round(Tally(cfg.output, COMPILE_SECONDS).take(), 2)  # warm-up, within model_idle
    retried = int(Tally(cfg.output, RETRIED_PER_ROW).take())
    foreign = folder.foreign(manifest["job_id"])
    summary = {
        "rows": t.rows,
        "errors": t.errors,
        "processed": t.processed,
        "errors_this_run": t.errors_this_run,
        "retried": done.retried,
        "batches_retried_per_row": retried,  # model batches that failed as a whole, then ran row by row
        "skipped": done.in_scope(scope),
        "repeated_ids": t.repeated_ids,
        "image_tokens_kept_mean": round(t.kept_sum / t.ok, 3) if t.ok else None,
        "flops_saved_pct": None if not t.flops_unpruned else round(saved_pct(t.flops, t.flops_unpruned), 2),
        "rows_per_second": round(t.processed / wall, 3) if wall > 0 else None,
        "wall_seconds": round(wall, 2),
        "seconds": seconds,
        "bound_by": bound_by(seconds),
        "run": manifest["runs"],
        "limit": cfg.limit,
        "moved_aside": done.moved_aside,
        "foreign_files": foreign,
        "input_files": len(manifest.get("inputs", [])),
        "missing_input_files": list(missing),  # known files no longer in the input: their rows stay
        "interrupted": interrupted,
        "config": manifest["config"],
    }
    folder.write_json(out_.SUMMARY, summary)
    if t.processed:
        print(summary["bound_by"], file=sys.stderr)
    if retried:
        print(f"warning: {retried} model batches failed as a whole and were retried row by row, which is slower "
              f"(out of memory? a smaller --batch-size may help): see batches_retried_per_row in {out_.SUMMARY}",
              file=sys.stderr)
    if t.repeated_ids:
        print(f"warning: {t.repeated_ids} rows repeat another row's id ({cfg.id_column or 'id'}); each input row "
              f"still has its own output row (column {INPUT_ROW})", file=sys.stderr)
    if missing:
        print(f"warning: {len(missing)} input files answered before are gone ({', '.join(missing[:3])}"
              f"{', ...' if len(missing) > 3 else ''}); their rows stay in {cfg.output}", file=sys.stderr)
    if t.duplicate_rows:
        print(f"warning: {t.duplicate_rows} input rows have more than one output row in {cfg.output}",
              file=sys.stderr)
    return summary
