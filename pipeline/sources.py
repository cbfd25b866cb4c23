"""Inputs as lists of files and the Ray Datasets that read them: Parquet (a file, a folder or
a glob, on any pyarrow filesystem), a folder of image or video files, a `datasets.save_to_disk`
folder, or a Hugging Face Hub dataset.

A source is listed before it is read, so that the job can read its files in an order that
keeps rows answered by an earlier run where they were (`pipeline.inputs`).
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray.data

from . import webdataset
from .common import filesystem, first_line, glob_root
from .workarounds import dataset_fingerprint, read_iterable_dataset, read_parquet_footers_here


class SourceError(ValueError):
    """The input cannot be opened: reported as one line before any work starts."""


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")
FEW_FILES = 16  # up to this many Parquet files, the driver reads their footers itself
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `org/name`


@dataclass
class InputFile:
    """One file of the input. `rows` and `fingerprint` are known up front only for an
    in-memory dataset; for files they are read when the job first meets the file."""

    name: str  # relative to the input's root: what the output's `source_file` says
    path: str  # what the reader opens, on the source's filesystem
    size: int
    mtime_ns: int | None = None
    rows: int | None = None
    fingerprint: str | None = None


@dataclass
class Source:
    kind: str  # "parquet", "media" (a file a row), "webdataset" (tar shards) or "dataset" (in memory)
    files: list[InputFile]  # in listing order
    fs: pafs.FileSystem | None
    base_dir: str | None  # where relative image / video paths start
    image_column: str  # the column that holds images unless the user names another
    video_column: str | None = None  # a folder of video files: the column of their bytes
    id_column: str | None = None  # the column that identifies a row unless the user names another
    dataset: Any = field(default=None, repr=False)  # kind "dataset": the ray Dataset
    json_fields: list[str] = field(default_factory=list)  # kind "webdataset": the JSON member's fields

    def read(self, paths: list[str]) -> ray.data.Dataset:
        """A dataset of `paths` (a subset of the files' paths) read in the order given."""
        if self.kind == "parquet":
            return read_parquet(paths, self.fs)
        if self.kind == "media":
            return ray.data.read_binary_files(paths, include_paths=True, filesystem=self.fs)
        if self.kind == "webdataset":
            return ray.data.read_datasource(webdataset.ShardDatasource(paths, self.json_fields, filesystem=self.fs))
        return self.dataset

    def column_names(self) -> list[str]:
        if self.kind == "media":
            return ["bytes", "path"]
        if self.kind == "webdataset":
            return webdataset.schema(self.json_fields).names
        if self.kind == "dataset":
            return self.dataset.schema().names
        return self.read([self.files[0].path]).schema().names


def open_source(uri: str, split: str | None = None, revision: str | None = None) -> Source:
    """List `uri`'s files; raises SourceError with a one-line reason."""
    kind = input_kind(uri)
    if kind == "hub":
        return _from_hub(uri, split, revision)
    if revision is not None:
        raise SourceError(f"--revision applies to a Hugging Face Hub dataset, not to {uri}")
    if "{" in uri:
        _no_split(split, uri)
        return _from_braces(uri)
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        names = {posixpath.basename(f.path) for f in fs.get_file_info(pafs.FileSelector(path))}
        if {"state.json", "dataset_dict.json"} & names:
            return _from_disk(uri, split)
        _no_split(split, uri)
        files = _listing(fs, path)
        parquet = [f for f in files if f.name.endswith(".parquet") and not _hidden(f.name, "_")]
        if parquet:
            return Source("parquet", parquet, fs, uri, "image")
        if not files:
            raise SourceError(f"input directory {uri} is empty")
        if sum(f.name.endswith(".tar") for f in files) > len(files) / 2:
            return _shards(fs, [f for f in files if f.name.endswith(".tar")], uri)
        videos = sum(f.name.lower().endswith(VIDEO_SUFFIXES) for f in files) > len(files) / 2
        return Source("media", files, fs, uri, "bytes", "bytes" if videos else None)
    _no_split(split, uri)
    if info.type == pafs.FileType.File:
        return Source("parquet", [_file(info, posixpath.basename(path))], fs, posixpath.dirname(uri), "image")
    if any(c in path for c in "*?["):
        found = [f for f in _listing(fs, glob_root(path)) if fnmatch.fnmatch(f.path, path)]
        if not found:
            raise SourceError(f"no files match {uri}")
        base = glob_root(uri)
        if all(f.name.endswith(".tar") for f in found):
            return _shards(fs, found, base)
        return Source("parquet", found, fs, posixpath.dirname(posixpath.join(base, found[0].name)), "image")
    raise SourceError(f"input not found: {uri}")


def _shards(fs: pafs.FileSystem, files: list[InputFile], root: str) -> Source:
    """WebDataset shards; their first sample tells the JSON fields and whether rows hold videos."""
    first = webdataset.first_sample(fs, files[0].path, files[0].size)
    video = not any(first.get(e) for e in webdataset.IMAGE_EXTS) and any(first.get(e) for e in webdataset.VIDEO_EXTS)
    return Source("webdataset", files, fs, root, "image", "video" if video else None, id_column="key",
                  json_fields=webdataset.fields(first))


def _from_braces(uri: str) -> Source:
    """`shards/{00000..00099}.tar` (or `{a,b}`): the expanded names, in order; each must exist."""
    root_uri = posixpath.dirname(uri.split("{")[0])
    fs, root = _filesystem(root_uri or ".")
    files = []
    for expanded in expand_braces(uri):
        name = expanded[len(root_uri) + 1:] if root_uri else expanded
        info = fs.get_file_info(posixpath.join(root, name))
        if info.type != pafs.FileType.File:
            raise SourceError(f"input not found: {expanded} (from {uri})")
        files.append(_file(info, name))
    if all(f.name.endswith(".tar") for f in files):
        return _shards(fs, files, root_uri)
    return Source("parquet", files, fs, root_uri, "image")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, in order: `{a,b}` and zero-padded ranges `{00..10}`."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(pattern[: m.start()] + o + pattern[m.end():])]


def input_kind(uri: str) -> str:
    """"hub" for a Hugging Face dataset name (`name` or `org/name`) that is not a local path,
    else "path" (a local path or a URI, which need not exist yet)."""
    if "://" in uri or uri.startswith(("/", ".", "~")) or os.path.exists(uri) or uri.endswith(".parquet"):
        return "path"
    if any(c in uri for c in "*?[{") or not HUB_NAME.fullmatch(uri):
        return "path"
    return "hub"


def read_parquet(paths: list[str], fs: pafs.FileSystem | None = None) -> ray.data.Dataset:
    """Ray Data's Parquet reader. Ray's newer reader starts two actors to read file footers:
    worth it for thousands of files, but on a laptop their start-up (~1 CPU-second each)
    competes with the model actor's, which bounds the run's start. For a few files the older
    reader reads the footers itself (one small sampling task)."""
    if len(paths) > FEW_FILES:
        return ray.data.read_parquet(paths, filesystem=fs)
    return read_parquet_footers_here(paths, fs)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return filesystem(uri)
    except Exception as e:
        raise SourceError(f"cannot open {uri}: {first_line(e)}") from None


def _file(info: pafs.FileInfo, name: str) -> InputFile:
    return InputFile(name, info.path, info.size, info.mtime_ns)


def _hidden(name: str, marks: str = ".") -> bool:
    return any(part.startswith(tuple(marks)) for part in name.split("/"))


def _listing(fs: pafs.FileSystem, root: str) -> list[InputFile]:
    """Every file below `root` but hidden ones, by name (their path relative to `root`)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, FileNotFoundError):
        return []
    files = [_file(i, posixpath.relpath(i.path, root)) for i in infos if i.type == pafs.FileType.File]
    return sorted((f for f in files if not _hidden(f.name)), key=lambda f: f.name)


def _no_split(split: str | None, uri: str) -> None:
    if split is not None:
        raise SourceError(f"--split applies to a Hugging Face dataset or a datasets.save_to_disk folder, "
                          f"not to {uri}")


def _dataset_source(ds: Any, name: str) -> Source:
    """One in-memory Hugging Face dataset, as one input file named `name`."""
    rows = ray.data.from_huggingface(ds)
    file = InputFile(name, name, 0, None, len(ds), dataset_fingerprint(ds))
    return Source("dataset", [file], None, None, "image", dataset=rows)


def _pick(splits: list[str], split: str | None, where: str) -> str:
    splits = sorted(splits)
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None:
        raise SourceError(f"{where} holds splits {', '.join(splits)}: choose one with --split")
    if split not in splits:
        raise SourceError(f"--split {split!r}: {where} has no such split; its splits: {', '.join(splits)}")
    return split


def _from_disk(path: str, split: str | None) -> Source:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        split = _pick(sorted(ds), split, path)
        return _dataset_source(ds[split], split)
    _no_split(split, f"{path} (a dataset without splits)")
    return _dataset_source(ds, "dataset")


PARQUET_BRANCH = "refs/convert/parquet"  # the Hub's Parquet conversion of every dataset it can read


def _from_hub(name: str, split: str | None, revision: str | None = None, hub: Any = None) -> Source:
    """A Hub dataset as its Parquet files, which the workers read; the driver only lists them
    (and reads their footers for row counts). The files are the repository's own, else the
    Hub's conversion branch; offline (`HF_HUB_OFFLINE=1`), those of its snapshot in the local
    cache. `hub`: an fsspec filesystem laid out as `HfFileSystem` (tests pass a local one)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and hub is None:
        return _from_snapshot(name, split, revision)
    if hub is None:
        from huggingface_hub import HfFileSystem

        hub = HfFileSystem()
    try:
        source = _hub_parquet(name, split, revision, hub)
    except FileNotFoundError:
        raise SourceError(f"input {name!r} is neither a local path nor a dataset on the Hugging Face Hub (a "
                          f"gated or private one needs HF_TOKEN)") from None
    except (OSError, ConnectionError) as e:
        raise SourceError(f"input {name!r}: cannot reach the Hugging Face Hub: {first_line(e)}") from None
    if source is not None:
        return source
    print(f"input {name!r} has no Parquet files on the Hub: streaming it with datasets", file=sys.stderr)
    return _stream_dataset(name, split, revision)


def _hub_parquet(name: str, split: str | None, revision: str | None, hub: Any) -> Source | None:
    for rev in [revision or "main"] + ([] if revision else [PARQUET_BRANCH]):
        root = f"datasets/{name}@{urllib.parse.quote(rev, safe='')}"
        if rev != PARQUET_BRANCH and not hub.exists(root):
            raise FileNotFoundError(root)
        found = {posixpath.relpath(p, root): info for p, info in hub.find(root, detail=True).items()
                 if info["type"] == "file" and p.endswith(".parquet")}
        if rev == PARQUET_BRANCH:  # `<config>/<split>/NNNN.parquet`: the default (or first) config
            configs = sorted({n.split("/")[0] for n in found})
            config = "default" if "default" in configs else (configs or [""])[0]
            found = {n: i for n, i in found.items() if n.startswith(config + "/")}
        if not found:
            continue
        split = _pick(list(_splits(sorted(found))), split, repr(name))
        files = [InputFile(n, f"{root}/{n}", found[n]["size"], None, None,
                           (found[n].get("lfs") or {}).get("sha256") or found[n].get("blob_id"))
                 for n in _splits(sorted(found))[split]]
        return Source("parquet", files, pafs.PyFileSystem(pafs.FSSpecHandler(hub)), None, "image")
    return None


def _splits(names: list[str]) -> dict[str, list[str]]:
    """Files by split, as the Hub assigns them (`datasets`' own default patterns)."""
    from datasets.data_files import _get_data_files_patterns

    def matching(pattern: str) -> list[str]:
        rx = re.compile(_glob_regex(pattern))
        return [n for n in names if rx.fullmatch(n)]

    try:
        patterns = _get_data_files_patterns(matching)
    except FileNotFoundError:
        return {"train": names}  # no split in any name: one split, as the Hub shows it
    return {str(s): sorted({n for p in ps for n in matching(p)}) for s, ps in patterns.items()}


def _glob_regex(pattern: str) -> str:
    """fsspec's glob as a regex: `*` within a name, `**` across folders (`**/` may be none)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _stream_dataset(name: str, split: str | None, revision: str | None) -> Source:
    """A Hub dataset without Parquet files, streamed by `datasets` in one read task: one input
    "file" whose rows are counted as they are read; its fingerprint is the Hub's commit."""
    import datasets
    from huggingface_hub import HfApi

    try:
        splits = datasets.get_dataset_split_names(name, revision=revision)
        split = _pick(splits, split, repr(name))
        ds = datasets.load_dataset(name, split=split, revision=revision, streaming=True)
        commit = HfApi().dataset_info(name, revision=revision).sha
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"input {name!r} cannot be streamed with datasets: {first_line(e)}") from None
    return _stream_source(ds, f"{name}:{split}", f"hub:{commit}")


def _stream_source(ds: Any, name: str, fingerprint: str) -> Source:
    """An IterableDataset as one input whose rows are counted as read. Ray's own datasource
    for it, not `from_huggingface`, which first asks the Hub for Parquet files (none here)."""
    file = InputFile(name, name, 0, None, None, fingerprint)
    return Source("dataset", [file], None, None, "image", dataset=read_iterable_dataset(ds))


def _from_snapshot(name: str, split: str | None, revision: str | None) -> Source:
    """The dataset's snapshot in the local Hub cache: its Parquet files of one split."""
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        raise SourceError(f"input {name!r} is neither a local path nor a Hugging Face dataset in the "
                          f"local cache (HF_HUB_OFFLINE is set)") from None
    fs = pafs.LocalFileSystem()
    names = [f.name for f in _listing(fs, root) if f.name.endswith(".parquet")]
    if not names:
        raise SourceError(f"input {name!r} has no Parquet files in the local cache")
    by_split = _splits(names)
    split = _pick(list(by_split), split, repr(name))
    files = [_file(fs.get_file_info(posixpath.join(root, n)), n) for n in by_split[split]]
    return Source("parquet", files, fs, root, "image")
