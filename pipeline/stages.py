"""The per-batch work of the job: ids, CPU preprocessing, and the model actor.

Every function maps a pyarrow batch to a pyarrow batch with the same rows: a row that
cannot be processed carries its reason forward in `_error` and ends as an error row.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pruner import Preprocessor, PrunedVLM
from pruner.vlm import Generation
from pruner.models import Prepared

from .config import COMPILE, DEFAULT_QUESTION, JobConfig
from .images import BadImage, decode, image_bytes
from .common import first_line
from .numbering import StopFlag, set_column
from . import schema as col
from .schema import OUTPUT_COLUMNS, PREP_ERROR, PREP_NOTE, PREP_SECONDS, PREPARED, output_table
from .urls import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES, Body, FetchError, Fetcher
from .videos import decode_video, video_bytes
from .workarounds import kv_put, kv_take


@dataclass(frozen=True)
class Columns:
    """Which input columns hold what (validated against the input's schema up front)."""

    image: str | None  # None: rows hold videos
    question: str | None  # None: every row gets the default question
    id: str | None  # None: ids are a hash of image (or video) and question
    default_question: str = DEFAULT_QUESTION
    video: str | None = None

    @property
    def media(self) -> str:
        return self.video or self.image


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
        images = batch.column(cols.media).to_pylist()
        ids = pa.array([_content_id(img, q) for img, q in zip(images, questions.to_pylist())], pa.string())
    batch = set_column(batch, col.ID, ids)
    return set_column(batch, col.QUESTION, questions)


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


Sample = Prepared | np.ndarray  # a prepared image row, or a video's uint8 frames [T, H, W, 3]


@dataclass(frozen=True)
class PrepareConfig:
    """What preprocessing takes from the job: the columns, where relative paths start, the
    model whose processor runs, and the limits on what a row may hold."""

    cols: Columns
    base_dir: str | None  # of the input: relative image and video paths start there
    model: str
    max_image_pixels: int
    num_frames: int
    max_video_seconds: float
    fetch_timeout: float
    fetch_retries: int

    @classmethod
    def of(cls, job: JobConfig, cols: Columns, base_dir: str | None) -> PrepareConfig:
        """From a resolved JobConfig."""
        return _take(cls, job, cols=cols, base_dir=base_dir)


@dataclass(frozen=True)
class AnswerConfig:
    """What a model actor takes from the job: the model and its pruning, generation, and the
    output folder its compile seconds are filed under."""

    model: str
    model_name: str  # the output's `model` column
    method: str
    keep: int | None
    rate: float | None
    prune_layer: int
    method_params: dict[str, Any]
    compile: str  # a key of COMPILE
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    output: str

    @classmethod
    def of(cls, job: JobConfig) -> AnswerConfig:
        """From a resolved JobConfig."""
        return _take(cls, job)


def _take(cls: type, job: JobConfig, **given: Any) -> Any:
    """A `cls` of the JobConfig's values of its fields, but those `given`."""
    return cls(**{f.name: getattr(job, f.name) for f in fields(cls) if f.name not in given}, **given)


class Preparer:
    """CPU preprocessing: ids and questions, then fetch a batch's URLs (concurrently), decode
    images and run the processor, or decode and sample a video's frames. Adds `_prepared`,
    `_error` and `_note`, drops the image or video.

    A callable class, so that Ray Data starts these workers with the pipeline and the
    processor loads (torch and transformers import, ~5 s) while the first rows are read, not
    after; on a CPU-only node the model actor runs one itself (`samples`). A video's frames
    travel to the model actor as uint8, which runs the processor there: its float32 output is
    4x larger (a 32-frame clip: ~54 MiB)."""

    def __init__(self, cfg: PrepareConfig, preprocessor: Preprocessor | None = None):
        # its own (a CPU worker ahead of GPU actors): uint8 pixels, normalised on the GPU
        self.preprocessor = preprocessor or Preprocessor.from_pretrained(cfg.model, uint8=True)
        self.cols, self.base_dir, self.max_pixels = cfg.cols, cfg.base_dir, cfg.max_image_pixels
        self.num_frames, self.max_video_seconds = cfg.num_frames, cfg.max_video_seconds
        self.fetcher = Fetcher(cfg.fetch_timeout, cfg.fetch_retries,
                               MAX_VIDEO_BYTES if cfg.cols.video else MAX_IMAGE_BYTES)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, samples = self.samples(batch)
        blobs = [None if x is None else serialize(x) for x in samples]
        return set_column(batch, PREPARED, pa.array(blobs, pa.binary()))

    def samples(self, batch: pa.Table) -> tuple[pa.Table, list[Sample | None]]:
        """The batch with ids, `_error`, `_note` and `_prep_seconds` and without its media, and
        each row's sample (None for an error row)."""
        start = time.process_time()
        cols = self.cols
        batch = assign_ids(batch, cols)
        read = batch.column(PREP_ERROR).to_pylist() if PREP_ERROR in batch.column_names else [None] * batch.num_rows
        cells = self.fetcher.fetch_all(batch.column(cols.media).to_pylist())  # URLs: their bodies, or why not
        rows = [(None, None, why) if why else self._one(cell, q)  # a reader's error (a damaged shard) stands
                for cell, q, why in zip(cells, batch.column(col.QUESTION).to_pylist(), read)]
        samples, notes, errors = (list(x) for x in zip(*rows)) if rows else ([], [], [])
        batch = batch.drop_columns([cols.media])
        batch = set_column(batch, PREP_NOTE, pa.array(notes, pa.string()))
        cpu = (time.process_time() - start) / max(batch.num_rows, 1)
        batch = set_column(batch, PREP_SECONDS, pa.array([cpu] * batch.num_rows, pa.float64()))
        return set_column(batch, PREP_ERROR, pa.array(errors, pa.string())), samples

    def _one(self, cell: Any, question: str) -> tuple[Sample | None, str | None, str | None]:
        """(sample, note, error) of one row; never raises. A URL's cell is its fetched `Body`,
        or the `FetchError` that says why there is none."""
        if isinstance(cell, FetchError):
            return None, None, first_line(cell)
        body = cell if isinstance(cell, Body) else None
        where = f" ({body.source})" if body else ""  # the URL cell is not in the output
        try:
            if self.cols.video is not None:
                data = body.data if body else video_bytes(cell, self.base_dir)
                clip = decode_video(data, self.num_frames, self.max_pixels, self.max_video_seconds)
                return clip.frames, clip.note, None
            image = decode(body.data if body else image_bytes(cell, self.base_dir), self.max_pixels)
            return self.preprocessor(image, question), None, None
        except (BadImage, ValueError) as e:
            return None, None, first_line(e) + where
        except Exception as e:  # never fail the batch for one row
            return None, None, f"preprocessing failed: {type(e).__name__}: {first_line(e)}{where}"


def serialize(x: Sample) -> bytes:
    """Safetensors bytes: no pickle crosses process boundaries."""
    if isinstance(x, np.ndarray):
        return st_save({"frames": torch.from_numpy(x)})
    return st_save({"input_ids": x.input_ids.contiguous(),
                    **{f"vision.{k}": v.contiguous() for k, v in x.vision.items()}})


def deserialize(data: bytes) -> Sample:
    tensors = st_load(data)
    if "frames" in tensors:
        return tensors["frames"].numpy()
    return Prepared(tensors.pop("input_ids"), {k.removeprefix("vision."): v for k, v in tensors.items()})


class Tally:
    """A number the model actors add to and the driver sums for the job's summary
    (`COMPILE_SECONDS`: their warm-up seconds; `RETRIED_PER_ROW`: model batches that failed as
    a whole and ran row by row): keys in Ray's cluster-wide key-value store, as `StopFlag`,
    under the output folder's name."""

    def __init__(self, output: str, name: str):
        self.prefix = f"vlm-pruner-{name}:{output}:".encode()

    def add(self, amount: float) -> None:
        if amount:
            kv_put(self.prefix + uuid.uuid4().hex.encode(), repr(amount).encode())

    def take(self) -> float:
        """The amounts added since the last take, summed over actors; their keys are deleted."""
        return sum(float(v) for v in kv_take(self.prefix))


COMPILE_SECONDS, RETRIED_PER_ROW = "compile", "retried-per-row"


class Answerer:
    """A model actor: loads one PrunedVLM and warms it up (compiling its decode step where
    `--compile` says, for the job's batch size), answers batches of prepared rows, or, given
    `prepare` (what a `Preparer` takes), of input rows that it preprocesses itself."""

    def __init__(self, cfg: AnswerConfig, threads: int | None = None, prepare: PrepareConfig | None = None,
                 stop: StopFlag | None = None):
        if threads is not None:  # Ray pins OMP_NUM_THREADS to the actor's reserved CPUs
            torch.set_num_threads(threads)
        self.vlm = PrunedVLM.from_pretrained(cfg.model, method=cfg.method, keep=cfg.keep, rate=cfg.rate,
                                             prune_layer=cfg.prune_layer, compile=COMPILE[cfg.compile],
                                             **cfg.method_params)
        Tally(cfg.output, COMPILE_SECONDS).add(self.vlm.warm_up(cfg.batch_size, cfg.max_new_tokens))
        self.cfg = cfg
        self.sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
        self.prunes = self.vlm.method.stage != "none"
        self.prepare = None if prepare is None else Preparer(prepare, preprocessor=self.vlm.preprocessor)
        self.context = self.vlm.adapter.text_config.max_position_embeddings  # tokens the LLM was trained on
        self.stop = stop

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        if self.stop is not None and self.stop.is_set():  # interrupted: these rows run again on resume
            batch = batch.slice(0, 0)
        if self.prepare is not None:
            batch, given = self.prepare.samples(batch)
        else:
            given = [None if b is None else deserialize(b) for b in batch.column(PREPARED).to_pylist()]
        errors = batch.column(PREP_ERROR).to_pylist()
        samples = self._samples(given, batch.column(col.QUESTION).to_pylist(), errors)
        results = self._generate(samples)
        seconds = (time.perf_counter() - start) / max(batch.num_rows, 1)
        rows = [self._row(results.get(i, errors[i]), seconds) for i in range(batch.num_rows)]
        columns = {name: [r.get(name) for r in rows] for name in OUTPUT_COLUMNS}
        for name in (col.ID, col.INPUT_ROW, col.SOURCE_FILE, col.SOURCE_ROW, col.QUESTION):
            if name in batch.column_names:  # the numbering stage adds the row's origin
                columns[name] = batch.column(name).to_pylist()
        columns[col.NOTE] = [n if r.get(col.ERROR) is None else None
                             for n, r in zip(batch.column(PREP_NOTE).to_pylist(), rows)]
        columns[col.PREPROCESS_SECONDS] = batch.column(PREP_SECONDS).to_pylist()
        carried = (PREPARED, PREP_ERROR, PREP_NOTE, PREP_SECONDS)
        passthrough = batch.drop_columns([c for c in carried if c in batch.column_names])
        return output_table(columns, passthrough)

    def _row(self, result: Generation | str, seconds: float) -> dict[str, Any]:
        """The output columns of one row: a generation, or the reason there is none."""
        row = {col.MODEL: self.cfg.model_name, col.METHOD: self.cfg.method, col.PRUNE_LAYER: self.cfg.prune_layer,
               col.SECONDS: seconds}
        if isinstance(result, str):
            return {**row, col.ERROR: result}
        f = result.flops
        return {**row, col.ANSWER: result.text,
                col.KEEP: result.image_tokens_kept if self.prunes else None,  # the budget applied, truthfully
                col.IMAGE_TOKENS: result.image_tokens, col.IMAGE_TOKENS_KEPT: result.image_tokens_kept,
                col.PROMPT_TOKENS: result.prompt_tokens, col.PROMPT_TOKENS_KEPT: result.prompt_tokens_kept,
                col.GENERATED_TOKENS: result.generated_tokens, col.FRAMES: result.frames,
                **({} if f is None else {col.FLOPS_VISION: f.flops_vision, col.FLOPS_PREFILL: f.flops_prefill,
                                         col.FLOPS_DECODE: f.flops_decode, col.FLOPS_TOTAL: f.flops_total,
                                         col.FLOPS_TOTAL_UNPRUNED: f.flops_total_unpruned,
                                         col.PAPER_PREFILL_FLOPS: f.paper_prefill,
                                         col.PAPER_PREFILL_FLOPS_UNPRUNED: f.paper_prefill_unpruned})}

    def _samples(self, given: list[Sample | None], questions: list[str],
                 errors: list[str | None]) -> dict[int, Prepared]:
        """Prepared samples by row: a video's frames go through the processor here; a row whose
        video the processor refuses gets its error."""
        out = {}
        for i, x in enumerate(given):
            if errors[i] is None:
                try:
                    out[i] = self.vlm.preprocessor(x, questions[i]) if isinstance(x, np.ndarray) else x
                except Exception as e:
                    errors[i] = f"preprocessing failed: {type(e).__name__}: {first_line(e)}"
                    continue
                errors[i] = self._too_long(len(out[i].input_ids), isinstance(x, np.ndarray))
                if errors[i] is not None:
                    del out[i]
        return out

    def _too_long(self, tokens: int, video: bool) -> str | None:
        """Why a prompt cannot be answered: past its context a model answers garbage, or runs
        out of memory on a GPU, so such a row never reaches it."""
        if tokens <= self.context:
            return None
        hint = "; fewer --num-frames would shorten it" if video else ""
        return f"prompt of {tokens:,} tokens exceeds the model's context of {self.context:,}{hint}"

    def _generate(self, samples: dict[int, Prepared]) -> dict[int, Generation | str]:
        """Generations by row; a row whose generation failed maps to its error message.
        Rows run in model batches of similar prompt length (`length_batches`). A batch runs
        as one; if that fails, each of its rows runs alone so one bad row cannot take the
        others with it."""
        rows = list(samples)
        out: dict[int, Generation | str] = {}
        for batch in length_batches([len(samples[i].input_ids) for i in rows], self.cfg.batch_size):
            out.update(self._generate_batch({rows[j]: samples[rows[j]] for j in batch}))
        return out

    def _generate_batch(self, samples: dict[int, Prepared]) -> dict[int, Generation | str]:
        generate = self.vlm.generate_prepared
        try:
            return dict(zip(samples, generate(list(samples.values()), self.cfg.max_new_tokens, **self.sampling)))
        except Exception:
            if len(samples) > 1:  # counted: on a GPU, out of memory turns into slow row-by-row mode
                Tally(self.cfg.output, RETRIED_PER_ROW).add(1)
            out: dict[int, Generation | str] = {}
            for i, s in samples.items():
                try:
                    out[i] = generate([s], self.cfg.max_new_tokens, **self.sampling)[0]
                except Exception as e:
                    out[i] = f"generation failed: {type(e).__name__}: {first_line(e)}"
            return out


def length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 in batches of at most `size`, by prompt length (ties: in
    order). A batch then pads its prompts little, and its rows, which ask alike, tend to
    finish decoding together: generation stops when a batch's last row does, so one long
    answer in a batch of short ones costs every row its decode steps."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]
