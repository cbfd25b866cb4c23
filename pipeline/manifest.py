"""The output folder's manifest (`_job.json`): which job configuration the folder records.

It holds the job id (in every output file's name), how many runs wrote there, the input files
met (`pipeline.inputs`), and the configuration: the fields that decide the answers and a
fingerprint of the model's files. A run with another configuration is refused before any work,
unless it overwrites; one with the same configuration resumes. The fingerprint reads the
model's files, so a run computes `configuration` once and passes it on.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from .common import JobError
from .config import ANSWER_FIELDS, JobConfig
from .output import MANIFEST, Folder, clear, own_tables

VERSION = 1


def model_fingerprint(model: str) -> str | None:
    """A digest of the checkpoint's files, so that a changed checkpoint at the same path is a
    different configuration. Small files (configs, tokenizer, processor) are hashed whole;
    weight files above 64 MiB by their size, their first and last 8 MiB and the safetensors
    header, which lists every tensor, so that hashing a 15 GB checkpoint takes well under a
    second. A hub name is fingerprinted by its cached snapshot's revision, None when absent."""
    if not os.path.isdir(model):
        try:
            from huggingface_hub import snapshot_download

            return "hub:" + Path(snapshot_download(model, local_files_only=True)).name
        except Exception:
            return None
    h = hashlib.sha256()
    for path in sorted(Path(model).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        size = path.stat().st_size
        h.update(f"{path.relative_to(model).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
                continue
            h.update(f.read(8 << 20))
            f.seek(size - (8 << 20))
            h.update(f.read())
    return h.hexdigest()[:32]


def configuration(cfg: JobConfig) -> dict:
    """What the manifest records of `cfg`: the answer-deciding fields and the model's fingerprint."""
    return {**cfg.answer_config(), "model_fingerprint": model_fingerprint(cfg.model)}


def differences(stored: dict, now: dict) -> list[str]:
    """`name: old -> new` for each answer-deciding field that differs."""
    names = [n for n in (*ANSWER_FIELDS, "model_fingerprint") if stored.get(n) != now.get(n)]
    return [f"{n}: {stored.get(n)!r} -> {now.get(n)!r}" for n in names]


def changed(folder: Folder, now: dict) -> list[str]:
    """How the configuration stored in `folder` differs from `now` (a `configuration`): empty
    when it does not, or when the folder holds no job yet."""
    stored = folder.read_json(MANIFEST)
    return [] if stored is None else differences(stored.get("config", {}), now)


def refuse_another(folder: Folder, now: dict) -> None:
    """Raise JobError, naming what differs, when `folder` holds another configuration."""
    diff = changed(folder, now)
    if diff:
        raise _refuse(folder, diff)


def _refuse(folder: Folder, diff: list[str]) -> JobError:
    return JobError(f"{folder.uri} holds a run with another configuration ({'; '.join(diff)}); "
                    f"pass --overwrite to start over, or use another --output")


def open_manifest(folder: Folder, now: dict, overwrite: bool) -> dict:
    """The manifest this run writes under: the stored one when its configuration is `now`, a
    new one (new job id) for an empty folder or with `overwrite`, which first clears what the
    old job wrote. Raises JobError when the folder holds another configuration. Called under
    the folder's lock: another run may have written the manifest since `refuse_another`."""
    stored = folder.read_json(MANIFEST)
    if stored is not None and not overwrite:
        diff = differences(stored.get("config", {}), now)
        if diff:
            raise _refuse(folder, diff)
        return {**stored, "runs": stored.get("runs", 0) + 1}
    if stored is not None or overwrite:
        clear(folder, (stored or {}).get("job_id"))
    return {"version": VERSION, "job_id": uuid.uuid4().hex[:12], "runs": 1, "config": now,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_manifest(folder: Folder, manifest: dict) -> None:
    folder.write_json(MANIFEST, manifest)


def read_rows(cfg: JobConfig, columns: list[str] | None = None) -> pa.Table:
    """Every row the job has written to cfg.output (only its own files)."""
    folder = Folder(cfg.output)
    manifest = folder.read_json(MANIFEST)
    files = folder.own_files(manifest["job_id"]) if manifest else []
    tables = [t for _, t in own_tables(folder, files, columns)]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
