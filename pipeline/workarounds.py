"""Where the pipeline relies on Ray's, Ray Data's or `datasets`' internals, each with why and
what would replace it; tests/test_workarounds.py fails when a library changes under one.

(The transformers ones are in `pruner.workarounds`: pruner/ imports neither pipeline/ nor Ray.)
"""
from __future__ import annotations

import logging
import re
from typing import Any

import pyarrow.fs as pafs
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: F401 (re-exported)
from ray.util.debug import log_once

# ---------------------------------------------------------------------- Ray's key-value store
# Ray has no public cluster-wide key-value store; a named actor would replace it, at the cost of
# one more actor's start-up per run. Without Ray in this process, puts are dropped and reads
# find nothing.


def _kv():
    from ray.experimental import internal_kv

    return internal_kv if internal_kv._internal_kv_initialized() else None


def kv_put(key: bytes, value: bytes) -> None:
    if (kv := _kv()) is not None:
        kv._internal_kv_put(key, value)


def kv_get(key: bytes) -> bytes | None:
    kv = _kv()
    return None if kv is None else kv._internal_kv_get(key)


def kv_delete(key: bytes) -> None:
    if (kv := _kv()) is not None:
        kv._internal_kv_del(key)


def kv_take(prefix: bytes) -> list[bytes]:
    """The values of every key that starts with `prefix`; the keys are deleted."""
    kv = _kv()
    if kv is None:
        return []
    keys = kv._internal_kv_list(prefix)
    values = [kv._internal_kv_get(k) for k in keys]
    for k in keys:
        kv._internal_kv_del(k)
    return [v for v in values if v is not None]


# ---------------------------------------------------------------------- reading


def read_parquet_footers_here(paths: list[str], fs: pafs.FileSystem | None = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray's older reader, which reads the files' footers in
    one small task rather than in two actors of its own, with its sampling bar and log lines
    off. Ray chooses the reader only by a context flag (`use_datasource_v2`), not by an
    argument; one would replace this."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.enable_progress_bars
    # Its sampling progress bar and log lines would print before the job's one-line errors.
    ctx.use_datasource_v2 = ctx.enable_progress_bars = False
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = before
        log.setLevel(level)
    ds.context.enable_progress_bars = before[1]  # the dataset copied the context: the job's bars stay
    return ds


def read_iterable_dataset(ds: Any) -> ray.data.Dataset:
    """A `datasets.IterableDataset` read in one task by Ray's own datasource for it, which Ray
    does not export: `from_huggingface` first asks the Hub for the dataset's Parquet files (a
    streamed one has none). A public reader of an IterableDataset would replace it."""
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    return ray.data.read_datasource(HuggingFaceDatasource(ds))


def dataset_fingerprint(ds: Any) -> str:
    """A `datasets.Dataset`'s own fingerprint (what its cache keys on): `datasets` has no
    public hash of a dataset's content."""
    return ds._fingerprint


# ---------------------------------------------------------------------- execution


def write_seconds(ds: ray.data.Dataset) -> float | None:
    """The writer's summed task time, parsed from the text of Ray Data's execution stats (None
    where Ray fused the write into another stage or the stats have another form): Ray Data
    gives per-operator times only as that text."""
    try:
        stats = ds.stats()
    except Exception:
        return None
    for block in stats.split("\n\n"):
        head = block.strip().splitlines()[0] if block.strip() else ""
        if re.match(r"Operator \d+ Write\b", head):
            m = re.search(r"Remote wall time: .*?([\d.]+)(us|ms|s) total", block)
            if m:
                return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    return None


def stage_compute(ds: ray.data.Dataset, name: str) -> Any:
    """How the stage of `ds` named `name` (e.g. "MapBatches(Numberer)") runs: its compute
    strategy, as given to `map_batches`. A Dataset shows its plan only through its logical
    plan's operators, which are internal."""
    op = ds._logical_plan.dag
    while op.name != name:
        if not op.input_dependencies:
            raise KeyError(f"no stage {name!r} in the dataset's plan")
        op = op.input_dependencies[0]
    return op.compute


# Ray Data's execution callbacks (`ExecutionCallback`, above, and the context's
# `custom_execution_callback_classes`) are its only hook into a running execution; they and
# the executor's state they read are internal. A public progress hook would replace them.


def executor_context(executor: Any) -> ray.data.DataContext:
    """The context an execution runs under (a deep copy of the dataset's)."""
    return executor._data_context


def rows_into_sink(executor: Any) -> int:
    """Rows put out so far by the operators that feed the execution's last one (the writer),
    as Ray Data's own bars count them."""
    sink, _ = executor._output_node
    return sum(op.metrics.rows_task_outputs_generated for op in sink.input_dependencies)


def silence_bars_off_warning() -> None:
    """Ray Data warns, once per process, that its bars are off and how to turn them back on;
    marking its warning's key as logged is the only way to skip it."""
    log_once("ray_data_progress_manager_disabled")
