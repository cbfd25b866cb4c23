"""The captioning / labeling job as a Ray Data pipeline:

read -> ids and resume filter -> decode + preprocess (CPU tasks) -> model actors -> Parquet.
"""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data
from transformers import AutoConfig

from pruner.methods import get_method
from pruner.models import adapter_class

from . import resume
from .demo import EVAL_PARQUET, MODEL_DIR
from .images import DEFAULT_MAX_PIXELS
from .sources import Source, SourceError, open_source
from .stages import DEFAULT_QUESTION, Answerer, Columns, assign_ids, prepare

SUMMARY = "_summary.json"


class JobError(ValueError):
    """Bad arguments: reported as one line before any work starts."""


@dataclass
class JobConfig:
    input: str = str(EVAL_PARQUET)
    output: str = "out/caption"
    model: str | None = None  # None: the bundled demo model
    method: str = "vlm-pruner"
    keep: int | None = None  # None with rate None: 64
    rate: float | None = None
    prune_layer: int = 2
    batch_size: int = 8
    max_new_tokens: int = 32
    question: str = DEFAULT_QUESTION
    split: str | None = None
    image_column: str | None = None
    question_column: str | None = None
    id_column: str | None = None
    concurrency: int = 1
    num_gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    threads_per_actor: int | None = None  # torch threads of a CPU actor; None: the node's CPUs / concurrency
    limit: int | None = None
    resume: bool = True
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_file: int = 512
    method_params: dict = field(default_factory=dict)

    @property
    def model_path(self) -> str:
        return self.model or str(MODEL_DIR)

    @property
    def model_name(self) -> str:
        return self.model or "demo"


def check(cfg: JobConfig) -> None:
    """Everything that can be wrong with the arguments alone, before Ray starts."""
    try:
        method = get_method(cfg.method)
        method.check_params(cfg.method_params)
    except ValueError as e:
        raise JobError(str(e)) from None
    if cfg.keep is not None and cfg.rate is not None:
        raise JobError("give --keep or --rate, not both")
    if cfg.keep is not None and (isinstance(cfg.keep, bool) or cfg.keep < 1):
        raise JobError(f"--keep must be >= 1, got {cfg.keep}")
    if cfg.rate is not None and not 0 <= cfg.rate < 1:
        raise JobError(f"--rate must be in [0, 1), got {cfg.rate}")
    for name in ("batch_size", "max_new_tokens", "concurrency", "max_image_pixels", "rows_per_file"):
        if getattr(cfg, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads_per_actor is not None and cfg.threads_per_actor < 1:
        raise JobError(f"--threads-per-actor must be >= 1, got {cfg.threads_per_actor}")
    if cfg.limit is not None and cfg.limit < 1:
        raise JobError(f"--limit must be >= 1, got {cfg.limit}")
    try:
        config = AutoConfig.from_pretrained(cfg.model_path)
        adapter_class(config.model_type)
    except ValueError as e:
        raise JobError(str(e).splitlines()[0]) from None
    except OSError as e:
        raise JobError(f"cannot load model {cfg.model_path!r}: {str(e).splitlines()[0]}") from None
    layers = config.get_text_config().num_hidden_layers
    if method.stage == "layer" and not 1 <= cfg.prune_layer < layers:
        raise JobError(f"--prune-layer must be in [1, {layers - 1}] for this {layers}-layer model, got {cfg.prune_layer}")


def columns(cfg: JobConfig, source: Source) -> Columns:
    names = source.dataset.schema().names
    image = cfg.image_column or source.image_column

    def need(flag: str, name: str) -> str:
        if name not in names:
            raise JobError(f"{flag} {name!r} is not a column of {cfg.input}; columns: {', '.join(names)}")
        return name

    need("--image-column", image)
    question = need("--question-column", cfg.question_column) if cfg.question_column else (
        "question" if "question" in names else None)
    id_col = need("--id-column", cfg.id_column) if cfg.id_column else ("id" if "id" in names else None)
    return Columns(image=image, question=question, id=id_col, default_question=cfg.question)


def run(cfg: JobConfig) -> dict:
    """Run the job to completion; returns (and writes) the summary."""
    check(cfg)
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        source = open_source(cfg.input, cfg.split)
    except SourceError as e:
        raise JobError(str(e)) from None
    cols = columns(cfg, source)
    if not cfg.resume:
        _clear(cfg.output)
    before = resume.scan(cfg.output)

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.limit is not None  # --limit means the first rows
    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cpus = ray.cluster_resources().get("CPU", 1)

    ds = source.dataset
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    done = pa.array(sorted(before.ids), pa.string())
    ds = ds.map_batches(_ids_and_skip, fn_kwargs={"cols": cols, "done": done}, batch_format="pyarrow",
                        num_cpus=0.25)
    # One model batch per block, so answers stream to the writer as batches finish rather
    # than when a whole input file is done.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(prepare, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs={"cols": cols, "model_path": cfg.model_path, "base_dir": source.base_dir,
                                   "max_pixels": cfg.max_image_pixels})
    ds = ds.map_batches(
        Answerer, batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.concurrency,
        num_gpus=gpus, num_cpus=1 if gpus > 0 else min(1.0, cpus / 2),
        fn_constructor_kwargs={"model_path": cfg.model_path, "model_name": cfg.model_name,
                               "threads": None if gpus > 0 else actor_threads(cfg, cpus),
                               "method": cfg.method, "keep": cfg.keep, "rate": cfg.rate,
                               "prune_layer": cfg.prune_layer, "max_new_tokens": cfg.max_new_tokens,
                               "method_params": cfg.method_params})
    start = time.perf_counter()
    ds.write_parquet(cfg.output, min_rows_per_file=cfg.rows_per_file)
    wall = time.perf_counter() - start
    return write_summary(cfg, before, wall)


def actor_threads(cfg: JobConfig, cpus: float) -> int:
    """Torch threads of a CPU model actor. Ray sets OMP_NUM_THREADS to an actor's reserved CPUs
    (1 here, or less, so that reading and preprocessing are never starved), which left torch
    one thread on a node with more cores: the job ran at 0.47x a plain loop on 2 cores. The
    model is the work, so it gets the node's cores; the light CPU tasks share them."""
    if cfg.threads_per_actor is not None:
        return cfg.threads_per_actor
    return max(1, int(cpus) // cfg.concurrency)


def _ids_and_skip(batch: pa.Table, cols: Columns, done: pa.Array) -> pa.Table:
    batch = assign_ids(batch, cols)
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))


def write_summary(cfg: JobConfig, before: resume.OutputState, wall: float) -> dict:
    after = resume.scan(cfg.output)
    new_files = [f for f in after.files if f not in set(before.files)]
    cols = ["id", "error", "image_tokens_kept", "flops_total", "flops_total_unpruned"]
    everything = resume.read_rows(cfg.output, after.files, cols)
    new = resume.read_rows(cfg.output, new_files, cols)
    ok = everything.filter(pc.is_null(everything.column("error"))) if everything.num_rows else everything

    def total(name: str) -> int:
        return int(pc.sum(ok.column(name)).as_py() or 0) if ok.num_rows else 0

    unpruned = total("flops_total_unpruned")
    summary = {
        "rows": everything.num_rows,
        "processed": new.num_rows,
        "skipped": len(before.ids),
        "errors": int(pc.sum(pc.is_valid(new.column("error"))).as_py() or 0) if new.num_rows else 0,
        "image_tokens_kept_mean": float(pc.mean(ok.column("image_tokens_kept")).as_py() or 0) if ok.num_rows else None,
        "flops_saved_pct": round(100 * (1 - total("flops_total") / unpruned), 2) if unpruned else None,
        "rows_per_second": round(new.num_rows / wall, 3) if wall > 0 else None,
        "wall_seconds": round(wall, 2),
        "moved_aside": before.moved_aside + after.moved_aside,
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    fs, root = resume._fs(cfg.output)
    with fs.open_output_stream(posixpath.join(root, SUMMARY)) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary


def _clear(output: str) -> None:
    """--no-resume: start over, removing what an earlier run wrote."""
    fs, root = resume._fs(output)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name.endswith(".parquet") or info.base_name == SUMMARY:
            fs.delete_file(info.path)
