"""The job's configuration: one frozen object, and the command-line flags built from it (shared
by `jobs/caption.py` and `jobs/compare.py`).

Each field carries its flag's help and whether it decides the answers (`_field`). Those that
do (model, method, budget, prompt, columns, ...; `ANSWER_FIELDS`) are written to the output
folder's manifest, and a rerun with other values is refused. The rest only decide how the job
runs (batch size, actors, limit, ...) and may change from one run to the next.

Making a `JobConfig` checks what can be checked from the values alone. `resolved()` fills in
the defaults that depend on the machine (absolute paths, the bundled model, the budget) and
checks the values against the model's checkpoint; the job calls it once as it starts.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from pruner.methods import METHODS, Method, get_method
from pruner.models import ADAPTERS, adapter_class
from pruner.vlm import DEFAULT_KEEP, budget

from .common import JobError, first_line
from .demo import EVAL_PARQUET, MODEL_DIR
from .images import DEFAULT_MAX_PIXELS
from .sources import input_kind
from .urls import DEFAULT_FETCH_RETRIES, DEFAULT_FETCH_TIMEOUT
from .videos import DEFAULT_MAX_SECONDS, DEFAULT_NUM_FRAMES

DEFAULT_QUESTION = "Describe the image briefly."
COMPILE = {"auto": "auto", "on": True, "off": False}  # --compile -> PrunedVLM's compile


def _field(default: Any = MISSING, *, help: str, answers: bool = False, factory: Any = MISSING,
           option: str | None = None, parse: Callable[[Any], Any] | None = None, **argparse_kw: Any) -> Any:
    """A JobConfig field and its flag: `help` ("{default}" in it is the field's default),
    whether it decides the answers, and what the field's type does not say: argparse keywords
    (choices, action), the flag's name where it is not the field's (`option`), and what turns
    the parsed value into the field's (`parse`)."""
    return field(default=default, default_factory=factory, metadata={
        "help": help, "answers": answers, "option": option, "parse": parse, "argparse": argparse_kw})


def parse_method_params(given: list[str]) -> dict[str, Any]:
    """--method-param NAME=VALUE, each given once, as {NAME: VALUE}; raises JobError."""
    params: dict[str, Any] = {}
    for text in given:
        name, eq, value = text.partition("=")
        name = name.strip()
        if not eq or not name or not value.strip():
            raise JobError(f"--method-param takes NAME=VALUE, got {text!r}")
        if name in params:
            raise JobError(f"--method-param {name} is given twice")
        params[name] = param_value(value.strip())
    return params


def param_value(text: str) -> bool | int | float | str:
    """A method parameter's value as written: true/false, an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _method_params_help() -> str:
    takes = "; ".join(f"{m.name}: {', '.join(m.params)}" for m in METHODS.values() if m.params)
    return (f"a parameter of the pruning method, e.g. tau=0.7; repeatable; VALUE reads as true/false, an int, "
            f"a float, else text ({takes})")


@dataclass(frozen=True)
class JobConfig:
    input: str = _field(str(EVAL_PARQUET), answers=True, help=(
        "Parquet file, directory or glob (local or s3://...), a datasets.save_to_disk directory, a Hugging Face "
        "dataset name, or a folder of images (default: demo eval split)"))
    split: str | None = _field(None, answers=True, help="split of a Hugging Face dataset or DatasetDict")
    revision: str | None = _field(None, answers=True, help=(
        "branch, tag or commit of a Hugging Face Hub dataset (default: main)"))
    output: str = _field("out/caption", help="output directory (default: {default})")
    model: str | None = _field(None, answers=True, help="checkpoint path or name (default: the bundled demo model)")
    method: str = _field("vlm-pruner", answers=True, choices=list(METHODS), help="default: {default}")
    keep: int | None = _field(None, answers=True, help=f"image tokens kept per image (default {DEFAULT_KEEP})")
    rate: float | None = _field(None, answers=True, help="fraction of image tokens pruned, per image")
    prune_layer: int = _field(2, answers=True, help="K: prune after layer K-1 (default: {default})")
    method_params: dict[str, Any] = _field(
        factory=dict, answers=True, option="--method-param", action="append", metavar="NAME=VALUE",
        parse=parse_method_params, help=_method_params_help())
    max_new_tokens: int = _field(32, answers=True, help="default: {default}")
    temperature: float = _field(0.0, answers=True, help="sampling temperature; 0 is greedy (default)")
    top_p: float = _field(1.0, answers=True, help="nucleus sampling mass (default: {default})")
    seed: int | None = _field(None, answers=True, help="sampling seed")
    question: str = _field(DEFAULT_QUESTION, answers=True, help=(
        "prompt for rows without a question (default: {default!r})"))
    image_column: str | None = _field(None, answers=True, help="default: 'image' ('bytes' for a folder of images)")
    video_column: str | None = _field(None, answers=True, help=(
        "answer about a video a row: its column (bytes, a path relative to the dataset, or a URI); default for a "
        "folder of video files: 'bytes'"))
    question_column: str | None = _field(None, answers=True, help="default: 'question' when the input has it")
    id_column: str | None = _field(None, answers=True, help=(
        "row id copied to the output; default: the input's 'id' column, else a hash of image and question (ids "
        "may repeat: rows are tracked by position)"))
    max_image_pixels: int = _field(DEFAULT_MAX_PIXELS, answers=True, help=(
        "larger images (or video frames) become error rows (default: {default:,})"))
    num_frames: int = _field(DEFAULT_NUM_FRAMES, answers=True, help=(
        "frames sampled uniformly over each clip (default: {default})"))
    max_video_seconds: float = _field(DEFAULT_MAX_SECONDS, answers=True, help=(
        "longer clips become error rows (default: {default:g})"))
    fetch_timeout: float = _field(DEFAULT_FETCH_TIMEOUT, help=(
        "seconds per attempt at an http(s) URL in the image or video column (default: {default:g})"))
    fetch_retries: int = _field(DEFAULT_FETCH_RETRIES, help=(
        "attempts after the first at a URL that timed out, dropped the connection or answered 408, 429 or 5xx "
        "(default: {default})"))
    batch_size: int = _field(8, help="default: {default}")
    group_batches: int = _field(8, help=(
        "model batches an actor takes at once and regroups by prompt length, so that a batch pads little and "
        "finishes decoding together; 1: input order (default: {default})"))
    concurrency: int = _field(1, help="model actors (default: {default})")
    num_gpus_per_actor: float | None = _field(None, help="default: 1 when the cluster has GPUs, else 0 (CPU)")
    threads_per_actor: int | None = _field(None, help=(
        "torch threads of a CPU model actor (default: the node's CPUs / --concurrency)"))
    compile: str = _field("auto", choices=list(COMPILE), help=(
        "compile the decode step once per model actor (on CUDA also the prefill's layers after the selection; "
        "both replay as CUDA graphs); auto: on on CUDA, "
        "off on a CPU, where compiling costs more than it saves (default: {default})"))
    limit: int | None = _field(None, help="only the first N input rows")
    rows_per_file: int = _field(512, help=(
        "rows buffered per output file; a kill loses at most these (default: {default})"))
    overwrite: bool = _field(False, action="store_true", help=(
        "start over: delete this job's earlier output in --output (never other files), also when its "
        "configuration differs"))
    retry_errors: bool = _field(True, action=argparse.BooleanOptionalAction, help=(
        "rerun rows that ended in error (default: on)"))

    def __post_init__(self) -> None:
        """Check every field that can be checked without reading files; raises JobError with a
        one-line reason."""
        method = self._method()
        self._budget(method)
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

    def _method(self) -> Method:
        try:
            method = get_method(self.method)
            method.check_params(dict(self.method_params))
        except ValueError as e:
            raise JobError(str(e)) from None
        return method

    def _budget(self, method: Method) -> tuple[int | None, float | None]:
        """(keep, rate) with the pruner's default keep where neither is given."""
        if self.keep is not None and self.rate is not None:
            raise JobError("give --keep or --rate, not both")
        if method.stage == "none":
            if self.keep is not None or self.rate is not None:
                raise JobError("--keep / --rate have no effect with --method none")
            return None, None
        try:
            return budget(method.stage, self.keep, self.rate)
        except ValueError as e:
            raise JobError(f"--{e}") from None

    def resolved(self) -> JobConfig:
        """This configuration as a job runs it: the budget's default, local paths absolute (so
        that reruns from another directory compare equal), the bundled model where none is
        given; checked against the model's checkpoint (reads its config). Raises JobError.
        Resolving a resolved configuration gives it back unchanged."""
        method = self._method()
        keep, rate = self._budget(method)
        cfg = replace(self, keep=keep, rate=rate, method_params=dict(self.method_params),
                      model=local_path(self.model) if self.model else str(MODEL_DIR),
                      input=local_path(self.input), output=local_path(self.output, hub=False))
        layers, takes_video = model_info(cfg.model)
        if cfg.video_column is not None and not takes_video:
            raise JobError(f"--video-column: the model {cfg.model_name!r} takes no video (families that do: "
                           f"{', '.join(t for a in ADAPTERS if a.takes_video for t in a.model_types)})")
        if method.stage == "layer" and not 1 <= cfg.prune_layer < layers:
            raise JobError(f"--prune-layer must be in [1, {layers - 1}] for this {layers}-layer model, "
                           f"got {cfg.prune_layer}")
        return cfg

    @property
    def model_name(self) -> str:
        """What the output's `model` column says: "demo" for the bundled model."""
        return "demo" if self.model == str(MODEL_DIR) else self.model

    def answer_config(self) -> dict[str, Any]:
        """The fields that decide the answers, as JSON-able values (the manifest's config)."""
        return {name: getattr(self, name) for name in ANSWER_FIELDS}


ANSWER_FIELDS = tuple(f.name for f in fields(JobConfig) if f.metadata["answers"])


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


def add_job_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add the job's flags (all but `skip`), one a field, in the fields' order; defaults stay
    None so JobConfig's own apply."""
    hints = typing.get_type_hints(JobConfig)
    for f in fields(JobConfig):
        if f.name in skip:
            continue
        kw = dict(f.metadata["argparse"])
        hint = hints[f.name]
        kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}  # int | None: int
        for kind in (int, float):
            if kind in kinds and "action" not in kw:
                kw["type"] = kind
        parser.add_argument(f.metadata["option"] or "--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f.metadata["help"].format(default=f.default), **kw)


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The JobConfig fields given on the command line. Raises JobError for a value its flag's
    parser refuses."""
    parse = {f.name: f.metadata["parse"] for f in fields(JobConfig)}
    return {k: parse[k](v) if parse[k] else v for k, v in vars(args).items() if k in parse and v is not None}
