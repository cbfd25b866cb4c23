"""Rows are tied to where they come from: an input that gains, loses or changes files between
runs answers exactly the new rows, keeps the old ones' numbers and refuses changed content.
Also what a new user meets first: Hub names, overlapping spellings of the output, --split,
prompts beyond the context and Ctrl-C. Tests that start Ray have timeouts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from tiny import good_rows, png, table_of, write_parquet
from pipeline import output
from pipeline.config import JobConfig, JobError
from pipeline.inputs import plan_inputs
from pipeline.job import run
from pipeline.manifest import read_rows
from pipeline.sources import InputFile, Source, SourceError, input_kind, open_source

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def job(model_dir: str, data: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(model=model_dir, input=str(data), output=str(out),
                     **{"keep": 8, "max_new_tokens": 2, "batch_size": 4, **kw})


def rows_of(out: Path) -> list[dict]:
    return sorted(read_rows(JobConfig(output=str(out))).to_pylist(), key=lambda r: r["input_row"])


# ---------------------------------------------------------------- the plan, without Ray


def source_of(*files: tuple[str, int, str]) -> Source:
    """A stand-in source whose files' rows and fingerprints are known up front."""
    return Source("dataset", [InputFile(n, n, 10, None, rows, fp) for n, rows, fp in files], None, None, "image")


def test_known_files_keep_their_numbers_and_new_ones_come_after_whatever_their_names():
    first = plan_inputs(source_of(("b", 3, "fb"), ("d", 2, "fd")), None)
    assert [f.name for f in first.files] == ["b", "d"] and first.first_rows.tolist() == [0, 3]
    grown = plan_inputs(source_of(("a", 4, "fa"), ("b", 3, "fb"), ("c", 1, "fc"), ("d", 2, "fd")), first.record)
    assert [f.name for f in grown.files] == ["b", "d", "a", "c"]  # read order: known first
    assert grown.first_rows.tolist() == [0, 3, 5, 9] and grown.end == 10
    assert grown.table().column("start").to_pylist() == [0, 3, 5, 9]
    shrunk = plan_inputs(source_of(("a", 4, "fa"), ("c", 1, "fc"), ("d", 2, "fd")), grown.record)
    assert shrunk.missing == ["b"] and [f.name for f in shrunk.files] == ["d", "a", "c"]
    assert shrunk.first_rows.tolist() == [3, 5, 9] and shrunk.table().column("start").to_pylist() == [0, 2, 6]
    assert [r["file"] for r in shrunk.record] == ["b", "d", "a", "c"]  # b is remembered for its return
    # --limit 3 reads d's 2 rows then a's first: input_rows 3, 4 and 5
    assert np.flatnonzero(shrunk.scope(3)).tolist() == [3, 4, 5]
    with pytest.raises(JobError, match="input file d changed since this job answered it"):
        plan_inputs(source_of(("d", 2, "other")), grown.record)


def test_fingerprints_are_read_once_and_a_changed_file_is_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_parquet(good_rows(3), folder / "b.parquet")
    first = plan_inputs(open_source(str(folder)), None)
    assert [(r["file"], r["rows"], r["first_row"]) for r in first.record] == [("b.parquet", 3, 0)]
    os.utime(folder / "b.parquet")  # touched, same content: still the same file
    assert plan_inputs(open_source(str(folder)), first.record).record[0]["fingerprint"] == \
        first.record[0]["fingerprint"]
    write_parquet(good_rows(3, start=7), folder / "b.parquet")
    with pytest.raises(JobError, match=r"input file b.parquet changed .*--overwrite"):
        plan_inputs(open_source(str(folder)), first.record)


# ---------------------------------------------------------------- a grown input, through the job


@pytest.mark.slow
def test_a_folder_that_gains_a_file_sorting_first_answers_exactly_the_new_rows(local_ray, model_dir, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write_parquet(good_rows(3), folder / "b.parquet")
    run(job(model_dir, folder, out, id_column="key"))
    before = {r["id"]: r for r in rows_of(out)}
    write_parquet(good_rows(2, start=3), folder / "0.parquet")  # sorts before b.parquet
    second = run(job(model_dir, folder, out, id_column="key"))
    assert (second["rows"], second["processed"], second["skipped"]) == (5, 2, 3)
    got = rows_of(out)
    assert [(r["id"], r["input_row"], r["source_file"], r["source_row"]) for r in got] == [
        ("r0", 0, "b.parquet", 0), ("r1", 1, "b.parquet", 1), ("r2", 2, "b.parquet", 2),
        ("r3", 3, "0.parquet", 0), ("r4", 4, "0.parquet", 1)]
    assert all(got[i]["answer"] == before[f"r{i}"]["answer"] for i in range(3))
    manifest = json.loads((out / "_job.json").read_text())
    assert [(f["file"], f["rows"], f["first_row"]) for f in manifest["inputs"]] == [
        ("b.parquet", 3, 0), ("0.parquet", 2, 3)]
    assert all(len(f["fingerprint"]) == 32 and f["size"] > 0 for f in manifest["inputs"])

    kept = (folder / "b.parquet").read_bytes()
    write_parquet(good_rows(3, start=9), folder / "b.parquet")  # other content under a known name
    with pytest.raises(JobError, match="input file b.parquet changed"):
        run(job(model_dir, folder, out, id_column="key"))
    (folder / "b.parquet").write_bytes(kept)
    (folder / "0.parquet").unlink()
    third = run(job(model_dir, folder, out, id_column="key"))
    assert (third["rows"], third["processed"], third["missing_input_files"]) == (5, 0, ["0.parquet"])


@pytest.mark.slow
def test_a_folder_of_images_that_gains_an_image_sorting_first(local_ray, model_dir, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for name, seed in (("m.png", 1), ("z.png", 2)):
        (folder / name).write_bytes(png(tiny.image(seed)))
    run(job(model_dir, folder, out))
    (folder / "a.png").write_bytes(png(tiny.image(3)))
    second = run(job(model_dir, folder, out))
    assert (second["rows"], second["processed"]) == (3, 1)
    assert [(r["source_file"], r["input_row"]) for r in rows_of(out)] == [("m.png", 0), ("z.png", 1), ("a.png", 2)]


# ---------------------------------------------------------------- names and spellings


def hub_cache(root: Path, kind: str, name: str, files: dict[str, bytes]) -> None:
    """A Hugging Face Hub cache entry (`HF_HUB_CACHE` layout) for `kind` "models" or "datasets"."""
    entry = root / f"{kind}--{name.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        path = entry / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_hub_names_are_names_and_paths_are_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert input_kind("lmms-lab/textvqa") == input_kind("squad") == "hub"
    for path in ("data/x.parquet", "./textvqa", "/abs/dir", "s3://b/k", "in/*.parquet", "a/b/c"):
        assert input_kind(path) == "path", path
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert input_kind("org/name") == "path"  # a local folder of that name wins, as in transformers


@pytest.mark.slow
def test_hub_names_resolve_through_the_local_cache_offline(model_dir, tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "models", "org/tiny", {p.name: p.read_bytes() for p in Path(model_dir).iterdir()})
    parquet = tmp_path / "train.parquet"
    write_parquet(good_rows(3), parquet)
    test_part = tmp_path / "test.parquet"
    write_parquet(good_rows(1, start=5), test_part)
    hub_cache(cache, "datasets", "org/data", {"data/train-00000-of-00001.parquet": parquet.read_bytes(),
                                              "data/test-00000-of-00001.parquet": test_part.read_bytes()})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}

    script = str(ROOT / "jobs" / "caption.py")
    for args, line in [(("--model", "org/nope"), "--model 'org/nope' is neither a local checkpoint folder nor a "
                                                 "Hugging Face model in the local cache (HF_HUB_OFFLINE is set)"),
                       (("--model", "org/tiny", "--input", "org/none"), "input 'org/none' is neither a local path")]:
        proc = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and line in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, script, "--model", "org/tiny", "--input", "org/data", "--split", "train",
                           "--id-column", "key", "--keep", "8", "--max-new-tokens", "2", "--output", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = sorted(pq.read_table(tmp_path / "out", columns=["id", "error", "source_file"]).to_pylist(),
                  key=lambda r: r["id"])
    assert [(r["id"], r["error"], r["source_file"]) for r in rows] == [
        (f"r{i}", None, "data/train-00000-of-00001.parquet") for i in range(3)]
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert manifest["config"]["model"] == "org/tiny" and manifest["config"]["model_fingerprint"] == \
        "hub:0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("spelling", ["file://{d}", "file://{d}/", "{d}/", "{d}/../d", "link", "link/out",
                                      "{rel}"])
def test_the_output_overlapping_the_input_is_refused_however_it_is_spelled(model_dir, tmp_path, monkeypatch,
                                                                           spelling):
    folder = tmp_path / "d"
    folder.mkdir()
    write_parquet(good_rows(2), folder / "part.parquet")
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    out = spelling.format(d=folder, rel="d/out") if "{" in spelling else str(tmp_path / spelling)
    with pytest.raises(JobError, match="overlaps the input"):
        run(JobConfig(model=model_dir, input=str(folder), output=out))
    assert sorted(p.name for p in folder.iterdir()) == ["part.parquet"]


def test_split_is_refused_where_it_does_not_apply_and_named_where_it_is_wrong(tmp_path):
    import datasets

    data = tmp_path / "data.parquet"
    write_parquet(good_rows(2), data)
    with pytest.raises(SourceError, match="--split applies to a Hugging Face dataset"):
        open_source(str(data), "train")
    with pytest.raises(SourceError, match="--split applies to a Hugging Face dataset"):
        open_source(str(tmp_path), "train")
    with pytest.raises(SourceError, match="--revision applies to a Hugging Face Hub dataset"):
        open_source(str(data), None, "v1.0")
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"question": ["q"]}) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(SourceError, match=r"--split 'nosuch': .* has no such split; its splits: test, train"):
        open_source(str(tmp_path / "hf"), "nosuch")
    with pytest.raises(SourceError, match="holds splits test, train: choose one with --split"):
        open_source(str(tmp_path / "hf"))


def test_only_exact_job_file_names_are_the_jobs(tmp_path):
    job_id = "0123456789ab"
    name = output.FileNames(output.file_prefix(job_id, 2)).get_filename_for_task("9f" * 16, 3)
    assert output.is_own(name, job_id) and output.is_own(name.replace(".parquet", "-0.parquet"), job_id)
    for copy in (name.replace(".parquet", " (copy).parquet"), "copy of " + name, name + ".bak",
                 name.replace(job_id, job_id + "0")):
        assert not output.is_own(copy, job_id), copy


def test_an_output_file_that_cannot_be_read_is_named_not_skipped(tmp_path):
    folder = output.Folder(str(tmp_path))
    job_id = "0123456789ab"
    name = output.FileNames(output.file_prefix(job_id, 1)).get_filename_for_task("ab" * 16, 0)
    pq.write_table(pa.table({"input_row": [0, 1]}), tmp_path / name)  # an older layout: no `error` column
    with pytest.raises(JobError, match=f"{name} cannot be read as this job's output"):
        output.totals(folder, job_id, 1)
    (tmp_path / name).write_bytes(b"PAR1 half")  # still being written: skipped, its rows are not done
    assert output.totals(folder, job_id, 1).rows == 0


# ---------------------------------------------------------------- prompts beyond the context


def test_a_prompt_beyond_the_models_context_is_an_error_row_and_the_rest_are_answered(model_dir, tmp_path):
    rows = good_rows(3)
    rows[1]["question"] = " ".join(["what"] * 1500)  # 1,500+ tokens against the tiny model's 1,024
    table = table_of(rows).append_column("input_row", pa.array(range(3), pa.int64()))
    staged = tiny.preparer(model_dir, str(tmp_path))(table)
    out = tiny.answerer(model_dir, keep=8, max_new_tokens=2)(staged).to_pylist()
    assert out[1]["answer"] is None
    assert out[1]["error"].startswith("prompt of 1,5") and out[1]["error"].endswith(
        "tokens exceeds the model's context of 1,024")
    assert all(out[i]["error"] is None and out[i]["answer"] is not None for i in (0, 2))


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_writes_the_rows_in_flight_says_so_in_one_line_and_a_rerun_resumes(local_ray, model_dir, tmp_path):
    data, out = tmp_path / "data.parquet", tmp_path / "out"
    write_parquet(good_rows(5) * 20, data)  # 100 rows
    args = [sys.executable, "jobs/caption.py", "--model", model_dir, "--input", str(data), "--output", str(out),
            "--keep", "8", "--max-new-tokens", "8", "--batch-size", "2", "--group-batches", "1",
            "--rows-per-file", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(out.glob("labels-*.parquet")) and time.time() < deadline:
        time.sleep(0.2)  # the model is answering once the first rows are written
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith(("interrupted", "Traceback"))]
    assert proc.returncode == 130, stderr
    assert len(lines) == 2 and lines[1].startswith("interrupted: ") and "rerun the same command" in lines[1], stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and 0 < summary["rows"] < 100
    assert not (out / "_job.lock").exists()
    assert len(rows_of(out)) == summary["rows"]
    rerun = run(tiny.caption_config(args[2:]))  # the same command's configuration, in this process
    assert not rerun["interrupted"] and rerun["skipped"] == summary["rows"]
    got = rows_of(out)
    assert [r["input_row"] for r in got] == list(range(100))


def test_the_resume_benchmark_counts_every_row_it_wrote_or_fails(tmp_path):
    from pipeline.bench.scale import measure, write_finished

    job_id = write_finished(str(tmp_path), rows=1000, rows_per_file=300)
    got = measure(str(tmp_path), job_id, rows=1000)
    assert (got["rows"], got["files"], got["done_set_bytes"]) == (1000, 4, 1000)
    with pytest.raises(RuntimeError, match="wrote 1,001 rows but found 1,000 done"):
        measure(str(tmp_path), job_id, rows=1001)


def test_a_hub_dataset_is_listed_on_the_driver_and_read_as_its_parquet_files(local_ray, tmp_path):
    """A stand-in for HfFileSystem: a local folder laid out as the Hub's paths are."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.sources import _from_hub

    root = tmp_path / "hub"
    own = root / "datasets" / "org" / "data@main" / "data"
    own.mkdir(parents=True)
    write_parquet(good_rows(2), own / "train-00000-of-00002.parquet")
    write_parquet(good_rows(3, start=2), own / "train-00001-of-00002.parquet")
    write_parquet(good_rows(1, start=9), own / "test-00000-of-00001.parquet")
    (own.parent / "README.md").write_text("card")
    (root / "datasets" / "org" / "csv@main").mkdir(parents=True)
    (root / "datasets" / "org" / "csv@main" / "data.csv").write_text("question\nq\n")
    converted = root / "datasets" / "org" / "csv@refs%2Fconvert%2Fparquet" / "default" / "train"
    converted.mkdir(parents=True)
    write_parquet(good_rows(4), converted / "0000.parquet")
    hub = DirFileSystem(path=str(root), fs=LocalFileSystem())

    source = _from_hub("org/data", "train", None, hub)
    assert [f.name for f in source.files] == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    plan = plan_inputs(source, None)  # footers only: the driver reads no rows
    assert [r["rows"] for r in plan.record] == [2, 3]
    ds = source.read([f.path for f in plan.files])
    ds.context.execution_options.preserve_order = True
    assert [r["key"] for r in ds.take_all()] == ["r0", "r1", "r2", "r3", "r4"]
    assert [f.name for f in _from_hub("org/csv", None, None, hub).files] == ["default/train/0000.parquet"]
    with pytest.raises(SourceError, match="--split 'dev': 'org/data' has no such split; its splits: test, train"):
        _from_hub("org/data", "dev", None, hub)
    with pytest.raises(SourceError, match="neither a local path nor a dataset on the Hugging Face Hub"):
        _from_hub("org/none", None, None, hub)


def test_a_hub_dataset_without_parquet_files_streams_as_one_input_counted_as_read(local_ray, tmp_path, monkeypatch,
                                                                                  capsys):
    import datasets
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from pipeline import sources
    from pipeline.job import numbered_rows
    from pipeline.numbering import RunFiles

    (tmp_path / "hub" / "datasets" / "org" / "csv@main").mkdir(parents=True)
    (tmp_path / "hub" / "datasets" / "org" / "csv@main" / "data.csv").write_text("question\nq\n")
    stream = datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(7)]}).to_iterable_dataset()
    stand_in = sources._stream_source(stream, "org/csv:train", "hub:c0ffee")
    monkeypatch.setattr(sources, "_stream_dataset", lambda name, split, revision: stand_in)
    source = sources._from_hub("org/csv", None, None, DirFileSystem(path=str(tmp_path / "hub"), fs=LocalFileSystem()))
    assert source is stand_in
    assert capsys.readouterr().err.splitlines() == ["input 'org/csv' has no Parquet files on the Hub: streaming it "
                                                    "with datasets"]
    plan = plan_inputs(source, None)
    assert (plan.total, plan.table().column("start").to_pylist()) == (None, [0])
    assert np.flatnonzero(plan.scope(3)).tolist() == [0, 1, 2]
    assert plan_inputs(source, plan.record).files[0].name == "org/csv:train"  # the same commit: known
    with RunFiles() as files:
        files.write(plan.table(), np.zeros(0, bool))
        got = numbered_rows(source, plan, files.dir, limit=5).take_all()
    assert [(r["question"], r["input_row"], r["source_row"]) for r in got] == [(f"q{i}", i, i) for i in range(5)]
