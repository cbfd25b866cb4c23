"""The per-batch work of the job: ids, CPU preprocessing, and the model actor.

Every function maps a pyarrow batch to a pyarrow batch with the same rows: a row that
cannot be processed carries its reason forward in `_error` and ends as an error row.
"""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pruner import Preprocessor, PrunedVLM
from pruner.models import Prepared

from .images import BadImage, decode, image_bytes
from .schema import ERROR, OUTPUT_COLUMNS, PREPARED, output_table

DEFAULT_QUESTION = "Describe the image briefly."


@dataclass(frozen=True)
class Columns:
    """Which input columns hold what (validated against the input's schema up front)."""

    image: str
    question: str | None  # None: every row gets the default question
    id: str | None  # None: ids are a hash of image and question
    default_question: str = DEFAULT_QUESTION


def assign_ids(batch: pa.Table, cols: Columns) -> pa.Table:
    """Add `id` (string) and `question` (as given, or the default where missing or empty)."""
    n = batch.num_rows
    if cols.question is not None:
        given = batch.column(cols.question).cast(pa.string())
        questions = pc.if_else(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(given), ""), False),
                               given, cols.default_question)
    else:
        questions = pa.array([cols.default_question] * n, pa.string())
    if cols.id is not None:
        ids = batch.column(cols.id).cast(pa.string())
    else:
        images = batch.column(cols.image).to_pylist()
        ids = pa.array([_content_id(img, q) for img, q in zip(images, questions.to_pylist())], pa.string())
    batch = _set(batch, "id", ids)
    return _set(batch, "question", questions)


def _content_id(image: Any, question: str) -> str:
    """A stable id from the image's bytes (or its path, if the cell holds one) and question."""
    h = hashlib.sha256()
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        image = image.encode()
    h.update(bytes(image or b""))
    h.update(b"\0" + question.encode())
    return h.hexdigest()[:32]


def _set(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


@functools.lru_cache(maxsize=4)
def _preprocessor(model_path: str) -> Preprocessor:
    return Preprocessor.from_pretrained(model_path)  # once per worker process


def prepare(batch: pa.Table, cols: Columns, model_path: str, base_dir: str | None, max_pixels: int) -> pa.Table:
    """Decode images and run the processor (CPU). Adds `_prepared` and `_error`, drops the image."""
    preprocessor = _preprocessor(model_path)
    prepared, errors = [], []
    for cell, question in zip(batch.column(cols.image).to_pylist(), batch.column("question").to_pylist()):
        try:
            image = decode(image_bytes(cell, base_dir), max_pixels)
            prepared.append(serialize(preprocessor(image, question)))
            errors.append(None)
        except (BadImage, ValueError) as e:
            prepared.append(None)
            errors.append(str(e).splitlines()[0])
        except Exception as e:  # never fail the batch for one row
            prepared.append(None)
            errors.append(f"preprocessing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    batch = batch.drop_columns([cols.image])
    batch = _set(batch, PREPARED, pa.array(prepared, pa.binary()))
    return _set(batch, ERROR, pa.array(errors, pa.string()))


def serialize(p: Prepared) -> bytes:
    """Safetensors bytes: no pickle crosses process boundaries."""
    return st_save({"input_ids": p.input_ids.contiguous(),
                    **{f"vision.{k}": v.contiguous() for k, v in p.vision.items()}})


def deserialize(data: bytes) -> Prepared:
    tensors = st_load(data)
    return Prepared(tensors.pop("input_ids"), {k.removeprefix("vision."): v for k, v in tensors.items()})


class Answerer:
    """A model actor: loads one PrunedVLM, answers batches of prepared rows."""

    def __init__(self, model_path: str, model_name: str, method: str, keep: int | None, rate: float | None,
                 prune_layer: int, max_new_tokens: int, method_params: dict | None = None,
                 threads: int | None = None):
        if threads is not None:  # Ray pins OMP_NUM_THREADS to the actor's reserved CPUs
            torch.set_num_threads(threads)
        self.vlm = PrunedVLM.from_pretrained(model_path, method=method, keep=keep, rate=rate,
                                             prune_layer=prune_layer, **(method_params or {}))
        self.static = {"model": model_name, "method": method, "prune_layer": prune_layer,
                       "keep": keep if keep is not None else None}
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        n = batch.num_rows
        errors = batch.column(ERROR).to_pylist()
        blobs = batch.column(PREPARED).to_pylist()
        todo = [i for i in range(n) if errors[i] is None]
        results: dict[int, Any] = self._generate(todo, blobs)
        seconds = (time.perf_counter() - start) / max(n, 1)
        rows: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for i in range(n):
            out = results.get(i)
            error = errors[i] if errors[i] is not None else (out if isinstance(out, str) else None)
            gen = None if error is not None else out
            for name in OUTPUT_COLUMNS:
                rows[name].append(self._cell(name, gen, error, seconds))
        rows["id"] = batch.column("id").to_pylist()
        rows["question"] = batch.column("question").to_pylist()
        passthrough = batch.drop_columns([c for c in (PREPARED, ERROR) if c in batch.column_names])
        return output_table(rows, passthrough)

    def _generate(self, todo: list[int], blobs: list[bytes]) -> dict[int, Any]:
        """Generations by row; a row whose generation failed maps to its error message.
        The batch runs as one; if that fails, each row runs alone so one bad row cannot
        take the others with it."""
        if not todo:
            return {}
        samples = [deserialize(blobs[i]) for i in todo]
        try:
            return dict(zip(todo, self.vlm.generate_prepared(samples, self.max_new_tokens)))
        except Exception:
            out: dict[int, Any] = {}
            for i, s in zip(todo, samples):
                try:
                    out[i] = self.vlm.generate_prepared([s], self.max_new_tokens)[0]
                except Exception as e:
                    out[i] = f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return out

    def _cell(self, name: str, gen: Any, error: str | None, seconds: float) -> Any:
        if name in self.static:
            if name == "keep" and self.static["keep"] is None and gen is not None:
                return gen.image_tokens_kept  # rate= budgets: the row's own k
            return self.static[name]
        if name == "error":
            return error
        if name == "seconds":
            return seconds
        if gen is None:
            return None
        if name == "answer":
            return gen.text
        if name.startswith("flops_"):
            flops = gen.flops
            value = flops.get(name) if isinstance(flops, dict) else getattr(flops, name, None)
            return None if value is None else int(value)
        return getattr(gen, name, None)
