"""WebDataset shards as rows, in img2dataset's layout: tar members `KEY.jpg|png|webp` (or a
video, `KEY.mp4`) plus `KEY.json` and `KEY.txt`, a sample a key, in member order.

Ray Data's own `read_webdataset` fails the whole read task at a truncated shard and decodes
images itself; here a shard yields what it holds up to the damage, then one row whose
`_error` says what could not be read, and images stay bytes for the job's own bounded
decoding. The driver counts a shard's rows with the same walk over its headers only
(seeking past the data), so the two agree on every shard, damaged or not.
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FileBasedDatasource

from .common import first_line
from .schema import PREP_ERROR

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "m4v", "mov", "mkv", "webm", "avi")
TEXT = "txt"  # img2dataset's caption


def _key_ext(name: str) -> tuple[str, str] | tuple[None, None]:
    """`dir/000.jpg` -> (`dir/000`, `jpg`): the key ends at the base name's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem, ext.lower()) if dot and stem else (None, None)


def samples(f: Any, size: int, read_data: bool = True) -> Iterator[dict]:
    """Each sample of a shard (`f` a seekable file of `size` bytes) as {"key": str, ext: bytes,
    ...}; when the shard is damaged, then one {"key": None, PREP_ERROR: reason}. Without
    `read_data` the members' values are None and only headers are read."""
    sample: dict = {}
    count = 0
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
        for member in tar:
            key, ext = _key_ext(member.name)
            if not member.isfile() or key is None:
                continue
            if sample.get("key") != key:
                if sample:
                    yield sample
                    count += 1
                sample = {"key": key}
            if member.offset_data + member.size > size:
                raise tarfile.ReadError(f"{member.name} ends past the end of the file")
            sample[ext] = tar.extractfile(member).read() if read_data else None
        if not _only_padding(f, tar.offset, size):
            raise tarfile.ReadError(f"{size - tar.offset:,} bytes after the last member are not a tar member")
    except (tarfile.TarError, OSError, EOFError) as e:
        if len(sample) > 1:  # what was read of the sample the damage cut
            yield sample
            count += 1
        yield {"key": None, PREP_ERROR: f"shard damaged after {count} samples: {first_line(e)}"}
        return
    if sample:
        yield sample


def _only_padding(f: Any, end: int, size: int) -> bool:
    """Whether what follows the last member is the end-of-archive zeros and record padding
    (tarfile ends silently at a header cut short)."""
    if size - end > tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE:
        return False
    f.seek(end)
    return not f.read(size - end).strip(b"\0")


def first_sample(fs: pafs.FileSystem, path: str, size: int) -> dict:
    with fs.open_input_file(path) as f:
        return next(samples(f, size), {})


def fields(sample: dict) -> list[str]:
    """The JSON member's top-level fields, which become string columns."""
    try:
        data = json.loads(sample.get("json") or b"{}")
    except ValueError:
        return []
    return sorted(data) if isinstance(data, dict) else []


def rows(sample: dict, json_fields: list[str]) -> dict[str, Any]:
    """One output row: key, image or video bytes, caption text, JSON fields as strings."""
    image = next((sample[e] for e in IMAGE_EXTS if sample.get(e)), None)
    video = next((sample[e] for e in VIDEO_EXTS if sample.get(e)), None)
    text = sample.get(TEXT)
    try:
        meta = json.loads(sample["json"]) if sample.get("json") else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    row = {"key": sample["key"], "image": image, "video": video,
           TEXT: None if text is None else text.decode("utf-8", "replace"), PREP_ERROR: sample.get(PREP_ERROR)}
    for name in json_fields:
        value = meta.get(name)
        row[name] = value if value is None or isinstance(value, str) else json.dumps(value)
    return row


def schema(json_fields: list[str]) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("image", pa.binary()), ("video", pa.binary()), (TEXT, pa.string()),
                      (PREP_ERROR, pa.string()), *[(n, pa.string()) for n in json_fields if n not in
                                                   ("key", "image", "video", TEXT, PREP_ERROR)]])


class ShardDatasource(FileBasedDatasource):
    """Ray Data reads the shards (one read task per few shards, retries, any filesystem); this
    turns each into rows."""

    def __init__(self, paths: list[str], json_fields: list[str], **kw: Any):
        super().__init__(paths, **kw)
        self.json_fields = json_fields

    def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # seekable, with a size: the walk checks members against it

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        size = f.size()
        out = schema(self.json_fields)
        batch = []
        for sample in samples(f, size):
            batch.append(rows(sample, self.json_fields))
            if len(batch) == 256:
                yield pa.Table.from_pylist(batch, out)
                batch = []
        if batch:
            yield pa.Table.from_pylist(batch, out)
