"""Input datasets as Ray Datasets: Parquet (file, directory or glob, on any pyarrow
filesystem), a `datasets.save_to_disk` directory, a Hugging Face dataset name, or a folder
of image or video files."""
from __future__ import annotations

import fnmatch
import glob
import logging
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.data

from .common import filesystem, first_line


class SourceError(ValueError):
    """The input cannot be opened: reported as one line before any work starts."""


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")
FEW_FILES = 16  # up to this many Parquet files, the driver reads their footers itself


@dataclass
class Source:
    dataset: ray.data.Dataset
    base_dir: str | None  # where relative image / video paths start
    image_column: str  # the column that holds images unless the user names another
    video_column: str | None = None  # a folder of video files: the column of their bytes


def open_source(uri: str, split: str | None = None) -> Source:
    """Open `uri` lazily; raises SourceError with a one-line reason."""
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path) if fs is not None else None
    if info is not None and info.type == pafs.FileType.Directory:
        names = {posixpath.basename(f.path) for f in fs.get_file_info(pafs.FileSelector(path))}
        if {"state.json", "dataset_dict.json"} & names:
            return Source(_from_disk(uri, split), uri, "image")
        if any(n.endswith(".parquet") for n in names):
            return Source(read_parquet(uri, sum(n.endswith(".parquet") for n in names)), uri, "image")
        files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if f.type == pafs.FileType.File and not f.base_name.startswith(".")]
        if not files:
            raise SourceError(f"input directory {uri} is empty")
        ds = ray.data.read_binary_files(uri, include_paths=True)
        videos = sum(f.base_name.lower().endswith(VIDEO_SUFFIXES) for f in files) > len(files) / 2
        return Source(ds, uri, "bytes", "bytes" if videos else None)
    if info is not None and info.type == pafs.FileType.File:
        return Source(read_parquet(uri, 1), posixpath.dirname(uri), "image")
    if fs is not None and any(c in path for c in "*?["):
        files = _glob(fs, uri, path)
        if not files:
            raise SourceError(f"no files match {uri}")
        return Source(read_parquet(files, len(files)), posixpath.dirname(files[0]), "image")
    if "://" in uri or uri.startswith((".", "/")) or uri.endswith(".parquet"):
        raise SourceError(f"input not found: {uri}")
    return Source(_from_hub(uri, split), None, "image")


def read_parquet(paths: str | list[str], files: int) -> ray.data.Dataset:
    """Ray Data's Parquet reader for `files` files. Ray's newer reader starts two actors to
    read file footers: worth it for thousands of files, but on a laptop their start-up (~1
    CPU-second each) competes with the model actor's, which bounds the run's start. For a
    few files the older reader reads the footers itself (one small sampling task)."""
    if files > FEW_FILES:
        return ray.data.read_parquet(paths)
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.enable_progress_bars
    # Its sampling progress bar and log lines would print before the job's one-line errors.
    ctx.use_datasource_v2 = ctx.enable_progress_bars = False
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        ds = ray.data.read_parquet(paths)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = before
        log.setLevel(level)
    ds.context.enable_progress_bars = before[1]  # the dataset copied the context: the job's bars stay
    return ds


def _filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    if "://" in uri or "/" in uri or uri.endswith(".parquet") or posixpath.exists(uri):
        try:
            return filesystem(uri)
        except Exception as e:
            raise SourceError(f"cannot open {uri}: {first_line(e)}") from None
    return None, uri  # a bare name: a Hugging Face dataset


def _glob(fs: pafs.FileSystem, uri: str, path: str) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        return sorted(glob.glob(path))
    prefix = uri[: len(uri) - len(path)] if uri.endswith(path) else uri.split("://")[0] + "://"
    root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(prefix + f.path for f in found if fnmatch.fnmatch(f.path, path))


def _from_disk(path: str, split: str | None) -> ray.data.Dataset:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise SourceError(f"{path} holds splits {sorted(ds)}: choose one with --split")
        ds = ds[split]
    return ray.data.from_huggingface(ds)


def _from_hub(name: str, split: str | None) -> ray.data.Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise SourceError(f"input {name!r} is neither a path nor a loadable Hugging Face dataset: "
                          f"{first_line(e)}") from None
    return ray.data.from_huggingface(ds)
