"""The job's configuration: one frozen object, its defaults resolved and checked once, and the
command-line flags that build it (shared by `jobs/caption.py` and `jobs/compare.py`).

Fields split in two. `ANSWER_FIELDS` decide what the answers are (model, method, budget,
prompt, columns, ...): they are written to the output folder's manifest, and a rerun with
other values is refused. The rest only decide how the job runs (batch size, actors, limit,
...) and may change from one run to the next.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from pruner.methods import METHODS, get_method
from pruner.models import ADAPTERS, adapter_class
from pruner.vlm import budget

from .common import JobError, first_line
from .demo import EVAL_PARQUET, MODEL_DIR
from .images import DEFAULT_MAX_PIXELS
from .sources import input_kind
from .urls import DEFAULT_FETCH_RETRIES, DEFAULT_FETCH_TIMEOUT
from .videos import DEFAULT_MAX_SECONDS, DEFAULT_NUM_FRAMES

DEFAULT_QUESTION = "Describe the image briefly."
COMPILE = {"auto": "auto", "on": True, "off": False}  # --compile -> PrunedVLM's compile

ANSWER_FIELDS = ("input", "split", "revision", "model", "method", "keep", "rate", "prune_layer", "method_params",
                 "max_new_tokens", "temperature", "top_p", "seed", "question", "image_column", "video_column",
                 "question_column", "id_column", "max_image_pixels", "num_frames", "max_video_seconds")


@dataclass(frozen=True)
class JobConfig:
    # what determines the answers (the manifest)
    input: str = str(EVAL_PARQUET)
    model: str | None = None  # a checkpoint path or hub name; None: the bundled demo model
    method: str = "vlm-pruner"
    keep: int | None = None  # image tokens kept per image; None with rate None: pruner's default (64)
    rate: float | None = None  # fraction of each image's tokens pruned
    prune_layer: int = 2  # K: prune after layer K-1
    method_params: dict = field(default_factory=dict)
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    question: str = DEFAULT_QUESTION  # for rows without one
    split: str | None = None
    revision: str | None = None  # of a Hub dataset: a branch, tag or commit
    image_column: str | None = None
    video_column: str | None = None  # a video a row instead of an image
    question_column: str | None = None
    id_column: str | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # per image, and per video frame
    num_frames: int = DEFAULT_NUM_FRAMES  # sampled uniformly over each clip
    max_video_seconds: float = DEFAULT_MAX_SECONDS
    # how it runs
    output: str = "out/caption"
    batch_size: int = 8
    group_batches: int = 8  # model batches an actor call takes and regroups by prompt length
    concurrency: int = 1
    num_gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    threads_per_actor: int | None = None  # torch threads of a CPU actor; None: the node's CPUs / concurrency
    compile: str = "auto"  # the decode step through torch.compile: "on", "off", "auto" (on CUDA only)
    limit: int | None = None  # only the first N input rows
    rows_per_file: int = 512
    overwrite: bool = False  # start over when the output folder holds another configuration
    retry_errors: bool = True  # rerun rows that ended in error
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT  # seconds per attempt at an http(s) image or video
    fetch_retries: int = DEFAULT_FETCH_RETRIES  # attempts after the first, for what a retry may cure

    def __post_init__(self) -> None:
        """Resolve defaults and check every field; raises JobError with a one-line reason."""
        set_ = functools.partial(object.__setattr__, self)
        try:
            method = get_method(self.method)
            method.check_params(dict(self.method_params))
        except ValueError as e:
            raise JobError(str(e)) from None
        if self.keep is not None and self.rate is not None:
            raise JobError("give --keep or --rate, not both")
        if method.stage == "none":
            if self.keep is not None or self.rate is not None:
                raise JobError("--keep / --rate have no effect with --method none")
        else:
            try:
                keep, rate = budget(method.stage, self.keep, self.rate)
            except ValueError as e:
                raise JobError(f"--{e}") from None
            set_("keep", keep)
            set_("rate", rate)
        if self.image_column is not None and self.video_column is not None:
            raise JobError("give --image-column or --video-column, not both")
        if not self.max_video_seconds > 0:
            raise JobError(f"--max-video-seconds must be > 0, got {self.max_video_seconds}")
        for name in ("batch_size", "group_batches", "max_new_tokens", "concurrency", "max_image_pixels",
                     "rows_per_file", "num_frames"):
            _at_least(name, getattr(self, name), 1)
        _at_least("fetch_retries", self.fetch_retries, 0)
        if not 0 < self.fetch_timeout < math.inf:  # infinite: a server that never answers holds a worker
            raise JobError(f"--fetch-timeout must be a number of seconds > 0, got {self.fetch_timeout}")
        for name in ("threads_per_actor", "limit"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise JobError(f"--num-gpus-per-actor must be >= 0, got {self.num_gpus_per_actor}")
        if self.compile not in COMPILE:
            raise JobError(f"--compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if not self.temperature >= 0:
            raise JobError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise JobError(f"--top-p must be in (0, 1], got {self.top_p}")
        set_("method_params", dict(self.method_params))
        set_("model", local_path(self.model) if self.model else str(MODEL_DIR))
        set_("input", local_path(self.input))
        set_("output", local_path(self.output, hub=False))
        layers, takes_video = model_info(self.model)
        if self.video_column is not None and not takes_video:
            raise JobError(f"--video-column: the model {self.model_name!r} takes no video (families that do: "
                           f"{', '.join(t for a in ADAPTERS if a.takes_video for t in a.model_types)})")
        if method.stage == "layer" and not 1 <= self.prune_layer < layers:
            raise JobError(f"--prune-layer must be in [1, {layers - 1}] for this {layers}-layer model, "
                           f"got {self.prune_layer}")

    @property
    def model_name(self) -> str:
        """What the output's `model` column says: "demo" for the bundled model."""
        return "demo" if self.model == str(MODEL_DIR) else self.model

    def answer_config(self) -> dict[str, Any]:
        """The fields that decide the answers, as JSON-able values (the manifest's config)."""
        return {name: getattr(self, name) for name in ANSWER_FIELDS}


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise JobError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")


def local_path(uri: str, hub: bool = True) -> str:
    """Local paths absolute (so that reruns from another directory compare equal); URIs, and
    with `hub` Hugging Face Hub names (`org/name` where no such local path exists), as given."""
    if "://" in uri or (hub and input_kind(uri) == "hub"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


@functools.lru_cache(maxsize=16)
def model_info(model: str) -> tuple[int, bool]:
    """The checkpoint's LLM depth and whether its family takes video; raises JobError when the
    checkpoint cannot be used."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
        adapter = adapter_class(config.model_type)
    except ValueError as e:
        raise JobError(first_line(e)) from None
    except OSError as e:
        if os.path.isabs(model):
            raise JobError(f"cannot load model {model!r}: {first_line(e)}") from None
        hub = "in the local cache (HF_HUB_OFFLINE is set)" if _offline() else "in the local cache or on the Hub"
        raise JobError(f"--model {model!r} is neither a local checkpoint folder nor a Hugging Face model {hub}: "
                       f"{first_line(e)}") from None
    return config.get_text_config().num_hidden_layers, adapter.takes_video


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------- command line


def _flags() -> list[tuple[str, dict]]:
    """(field, argparse keywords) of every job flag, defined once for both command lines."""
    d = JobConfig.__dataclass_fields__
    default = {name: f.default for name, f in d.items()}
    return [
        ("input", dict(help="Parquet file, directory or glob (local or s3://...), a datasets.save_to_disk "
                            "directory, a Hugging Face dataset name, or a folder of images "
                            "(default: demo eval split)")),
        ("split", dict(help="split of a Hugging Face dataset or DatasetDict")),
        ("revision", dict(help="branch, tag or commit of a Hugging Face Hub dataset (default: main)")),
        ("output", dict(help=f"output directory (default: {default['output']})")),
        ("model", dict(help="checkpoint path or name (default: the bundled demo model)")),
        ("method", dict(choices=list(METHODS), help=f"default: {default['method']}")),
        ("keep", dict(type=int, help="image tokens kept per image (default 64)")),
        ("rate", dict(type=float, help="fraction of image tokens pruned, per image")),
        ("prune_layer", dict(type=int, help=f"K: prune after layer K-1 (default: {default['prune_layer']})")),
        ("max_new_tokens", dict(type=int, help=f"default: {default['max_new_tokens']}")),
        ("temperature", dict(type=float, help="sampling temperature; 0 is greedy (default)")),
        ("top_p", dict(type=float, help="nucleus sampling mass (default: 1.0)")),
        ("seed", dict(type=int, help="sampling seed")),
        ("question", dict(help=f"prompt for rows without a question (default: {DEFAULT_QUESTION!r})")),
        ("image_column", dict(help="default: 'image' ('bytes' for a folder of images)")),
        ("video_column", dict(help="answer about a video a row: its column (bytes, a path relative to the "
                                   "dataset, or a URI); default for a folder of video files: 'bytes'")),
        ("num_frames", dict(type=int, help=f"frames sampled uniformly over each clip (default: {DEFAULT_NUM_FRAMES})")),
        ("max_video_seconds", dict(type=float, help=f"longer clips become error rows "
                                                    f"(default: {DEFAULT_MAX_SECONDS:g})")),
        ("question_column", dict(help="default: 'question' when the input has it")),
        ("id_column", dict(help="row id copied to the output; default: the input's 'id' column, else a hash "
                                "of image and question (ids may repeat: rows are tracked by position)")),
        ("max_image_pixels", dict(type=int, help=f"larger images (or video frames) become error rows "
                                                 f"(default: {default['max_image_pixels']:,})")),
        ("fetch_timeout", dict(type=float, help=f"seconds per attempt at an http(s) URL in the image or video "
                                                f"column (default: {default['fetch_timeout']:g})")),
        ("fetch_retries", dict(type=int, help=f"attempts after the first at a URL that timed out, dropped the "
                                              f"connection or answered 408, 429 or 5xx "
                                              f"(default: {default['fetch_retries']})")),
        ("batch_size", dict(type=int, help=f"default: {default['batch_size']}")),
        ("group_batches", dict(type=int, help=f"model batches an actor takes at once and regroups by prompt "
                                              f"length, so that a batch pads little and finishes decoding "
                                              f"together; 1: input order (default: {default['group_batches']})")),
        ("concurrency", dict(type=int, help="model actors (default: 1)")),
        ("num_gpus_per_actor", dict(type=float, help="default: 1 when the cluster has GPUs, else 0 (CPU)")),
        ("threads_per_actor", dict(type=int, help="torch threads of a CPU model actor "
                                                  "(default: the node's CPUs / --concurrency)")),
        ("compile", dict(choices=list(COMPILE), help="compile the decode step once per model actor (on CUDA it "
                                                     "replays as a CUDA graph); auto: on on CUDA, off on a CPU, "
                                                     "where compiling costs more than it saves (default: auto)")),
        ("limit", dict(type=int, help="only the first N input rows")),
        ("rows_per_file", dict(type=int, help=f"rows buffered per output file; a kill loses at most these "
                                              f"(default: {default['rows_per_file']})")),
        ("overwrite", dict(action="store_true", help="start over: delete this job's earlier output in --output "
                                                     "(never other files), also when its configuration differs")),
        ("retry_errors", dict(action=argparse.BooleanOptionalAction, help="rerun rows that ended in error "
                                                                          "(default: on)")),
    ]


def add_job_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add the job's flags (all but `skip`); defaults stay None so JobConfig's own apply."""
    for name, kw in _flags():
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The JobConfig fields given on the command line."""
    names = {f.name for f in fields(JobConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
