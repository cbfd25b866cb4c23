"""The output folder is a labelling record: one configuration, only the job's own files, one
writer, exactly one row per input row. Tests that do not start Ray come first; the rest
share one local Ray and have timeouts."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline import manifest, output
from pipeline.config import JobConfig, JobError
from pipeline.job import bound_by, run, stage_seconds
from pipeline.manifest import read_rows
from pipeline.schema import OUTPUT_SCHEMA
from tiny import good_rows, table_of, write_parquet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def job(model_dir: str, data: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(model=model_dir, input=str(data), output=str(out), **{"keep": 8, "max_new_tokens": 2,
                                                                          "batch_size": 4, **kw})


def rows_of(out: Path) -> list[dict]:
    return read_rows(JobConfig(output=str(out))).to_pylist()


def caption(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/caption.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.parquet"
    write_parquet(good_rows(8), path)
    return path


# ---------------------------------------------------------------- before Ray starts


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_overlapping_the_input_is_refused_and_the_input_kept(model_dir, tmp_path, where):
    folder = tmp_path / "d"
    folder.mkdir()
    write_parquet(good_rows(3), folder / "part.parquet")
    before = (folder / "part.parquet").read_bytes()
    out = {"same": folder, "inside": folder / "out", "containing": tmp_path}[where]
    with pytest.raises(JobError, match="overlaps the input"):
        run(job(model_dir, folder if where != "containing" else folder / "part.parquet", out, overwrite=True))
    assert (folder / "part.parquet").read_bytes() == before and not ray.is_initialized()


def test_bad_output_paths_exit_2_with_one_line_before_ray(model_dir, data, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for out, message in [(tmp_path / "a-file", "is a file, not a folder"),
                         (tmp_path / "a-file" / "sub", "a-file is a file"),
                         (locked / "sub", "is not writable")]:
        if message == "is not writable" and os.geteuid() == 0:
            continue  # root writes anywhere
        with pytest.raises(JobError, match=message):
            run(job(model_dir, data, out))
    assert not ray.is_initialized() and (tmp_path / "a-file").read_text() == "mine"
    proc = caption("--model", model_dir, "--input", str(data), "--output", str(tmp_path / "a-file"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], proc.stderr


def test_a_live_hold_refuses_and_a_dead_one_is_taken_over(tmp_path):
    folder = output.Folder(str(tmp_path))
    lock = output.Lock(folder)
    with lock:
        with pytest.raises(JobError, match=f"held by a running job: pid {os.getpid()} on {socket.gethostname()}"):
            output.Lock(folder).acquire()
    assert not (tmp_path / output.LOCK).exists()  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a SIGKILLed run leaves its hold behind with a pid that is gone
    (tmp_path / output.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                    "since": 0, "heartbeat": time.time()}))
    with output.Lock(folder) as taken:
        assert json.loads((tmp_path / output.LOCK).read_text())["token"] == taken.me["token"]

    # another host: alive while it beats, stale once its heartbeat stops (a lost driver node)
    (tmp_path / output.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0,
                                                    "heartbeat": time.time()}))
    with pytest.raises(JobError, match="pid 1 on elsewhere"):
        output.Lock(folder).acquire()
    (tmp_path / output.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0,
                                                    "heartbeat": time.time() - output.STALE_SECONDS - 1}))
    with output.Lock(folder):
        pass


def test_the_files_keep_their_column_names_order_and_types():
    """A folder written before is read and resumed by this code: the fixed columns are the file format."""
    assert " ".join(f"{f.name}:{f.type}" for f in OUTPUT_SCHEMA) == (
        "id:string input_row:int64 source_file:string source_row:int64 question:string answer:string "
        "error:string model:string method:string keep:int32 prune_layer:int32 image_tokens:int32 "
        "image_tokens_kept:int32 prompt_tokens:int32 prompt_tokens_kept:int32 generated_tokens:int32 "
        "frames:int32 note:string flops_vision:int64 flops_prefill:int64 flops_decode:int64 flops_total:int64 "
        "flops_total_unpruned:int64 paper_prefill_flops:int64 paper_prefill_flops_unpruned:int64 "
        "seconds:double preprocess_seconds:double")


def test_defaults_are_resolved_in_one_step(model_dir):
    assert JobConfig(model=model_dir).keep is None and JobConfig().model is None  # making one reads nothing
    assert JobConfig(model=model_dir).resolved().keep == 64
    assert JobConfig(model=model_dir, rate=0.5).resolved().keep is None
    assert JobConfig(model=model_dir, method="none").resolved().keep is None
    with pytest.raises(JobError, match="have no effect with --method none"):
        JobConfig(model=model_dir, method="none", keep=8)  # found from the values alone
    with pytest.raises(JobError, match=r"--prune-layer must be in \[1, 3\]"):
        JobConfig(model=model_dir, prune_layer=4).resolved()  # found from the model's config
    cfg = JobConfig(model=model_dir, input="rel/data.parquet").resolved()
    assert os.path.isabs(cfg.input) and os.path.isabs(cfg.output)
    assert cfg.resolved() == cfg and JobConfig().resolved().model_name == "demo"


def test_stage_seconds_add_up_and_name_the_bound():
    t = output.Totals(model_seconds=18.0, preprocess_seconds=3.0)
    s = stage_seconds(t, wall=20.0, actors=1, write=0.5)
    assert s == {"wall": 20.0, "preprocess_cpu": 3.0, "model_busy": 18.0, "model_idle": 2.0, "write": 0.5,
                 "model_actors": 1}
    assert bound_by(s) == "bound by the model actor: busy 90% of wall (more actors or GPUs would help)"
    slow_prep = stage_seconds(output.Totals(model_seconds=4.0, preprocess_seconds=30.0), 20.0, 2, None)
    assert slow_prep["model_idle"] == 36.0 and bound_by(slow_prep).startswith("bound by preprocessing: 30.0 CPU-s")
    startup = stage_seconds(output.Totals(model_seconds=5.0, preprocess_seconds=1.0), 20.0, 1, None)
    assert bound_by(startup).startswith("bound by start-up and overhead: the model actor was busy 25% of wall")


# ---------------------------------------------------------------- the job on local Ray


@pytest.mark.slow
def test_configurations_are_never_mixed(local_ray, model_dir, data, tmp_path, monkeypatch):
    hashed, fingerprint = [], manifest.model_fingerprint  # the model each hash read
    monkeypatch.setattr(manifest, "model_fingerprint", lambda model: hashed.append(model) or fingerprint(model))
    out = tmp_path / "o"
    run(job(model_dir, data, out, limit=4))
    with pytest.raises(JobError) as e:
        run(job(model_dir, data, out, method="fastv", keep=4))
    assert "holds a run with another configuration (method: 'vlm-pruner' -> 'fastv'; keep: 8 -> 4)" in str(e.value)
    assert "--overwrite" in str(e.value) and len(str(e.value).splitlines()) == 1

    copy = tmp_path / "model-copy"
    shutil.copytree(model_dir, copy)
    with pytest.raises(JobError, match=r"\(model: '.*' -> '.*model-copy'; question_column: None -> 'key'\)"):
        run(job(str(copy), data, out, question_column="key"))  # a copy: same fingerprint, other path
    out2 = tmp_path / "o2"
    run(job(str(copy), data, out2, limit=2))
    with open(copy / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(JobError, match=r"\(model_fingerprint: '\w+' -> '\w+'\)"):  # same path, other files
        run(job(str(copy), data, out2))

    # options that do not change answers may differ; --overwrite starts over with the new configuration
    hashed.clear()
    again = run(job(model_dir, data, out, batch_size=2, rows_per_file=1))
    assert (again["rows"], again["processed"], again["skipped"]) == (8, 4, 4)
    # reading a large checkpoint takes seconds: one hash serves the check before Ray and the manifest
    assert len(hashed) == 1
    summary = run(job(model_dir, data, out, method="fastv", keep=4, overwrite=True, limit=4))
    got = rows_of(out)
    assert {r["method"] for r in got} == {"fastv"} and len(got) == 4 == summary["rows"]
    assert summary["image_tokens_kept_mean"] == 4.0 and summary["config"]["method"] == "fastv"


@pytest.mark.slow
def test_foreign_files_are_never_read_moved_or_deleted(local_ray, model_dir, data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    pq.write_table(pa.table({"label": [1, 2]}), out / "labels.parquet")  # no id column
    pq.write_table(table_of(good_rows(3)).append_column("id", pa.array(["r0", "r1", "r2"])),
                   out / "my_data.parquet")  # ids that overlap the input's
    (out / "notes.txt").write_text("mine")
    (out / "_tmp-mine.txt").write_text("mine too")  # looks like a temporary name, but is not the job's
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    first = run(job(model_dir, data, out, id_column="key"))
    assert (first["rows"], first["processed"], first["skipped"]) == (8, 8, 0)
    seconds = first["seconds"]  # where the time went: the parts add up to the actors' wall time
    assert seconds["model_busy"] + seconds["model_idle"] == pytest.approx(seconds["wall"], abs=0.02)
    assert seconds["model_busy"] == pytest.approx(sum(r["seconds"] for r in rows_of(out)), abs=0.01)
    assert seconds["preprocess_cpu"] > 0 and first["bound_by"].startswith("bound by")
    assert sorted(first["foreign_files"]) == sorted(before)
    run(job(model_dir, data, out, id_column="key", overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert sorted(r["id"] for r in rows_of(out)) == sorted(f"r{i}" for i in range(8))


@pytest.mark.slow
def test_repeated_ids_give_one_row_per_input_row(local_ray, model_dir, tmp_path, capfd):
    rows = good_rows(16)
    for i, r in enumerate(rows):
        r["key"] = f"k{i % 4}"  # 4 distinct ids over 16 rows
    parts = tmp_path / "parts"
    parts.mkdir()
    for j in range(3):  # several files and small row groups: many blocks, read in parallel
        pq.write_table(table_of(rows[j * 6:(j + 1) * 6]), parts / f"part-{j}.parquet", row_group_size=2)
    out = tmp_path / "o"
    first = run(JobConfig(model=model_dir, input=str(parts), output=str(out), id_column="key", keep=8,
                          max_new_tokens=2, batch_size=3, limit=8))
    second = run(JobConfig(model=model_dir, input=str(parts), output=str(out), id_column="key", keep=8,
                           max_new_tokens=2, batch_size=3))
    got = rows_of(out)
    assert (first["rows"], second["rows"], second["skipped"], second["processed"]) == (8, 16, 8, 8)
    assert sorted(r["input_row"] for r in got) == list(range(16))
    assert all(r["label"] == r["input_row"] and r["id"] == f"k{r['label'] % 4}" for r in got)  # in input order
    assert second["repeated_ids"] == 12
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings[-1].startswith("warning: 12 rows repeat another row's id")


@pytest.mark.slow
def test_error_rows_are_retried_without_duplicates(local_ray, model_dir, tmp_path):
    images = tmp_path / "images"
    rows = good_rows(6)
    table = pa.table({"key": [r["key"] for r in rows], "image": [f"images/{i}.png" for i in range(6)],
                      "question": [r["question"] for r in rows]})
    pq.write_table(table, tmp_path / "data.parquet")
    out = tmp_path / "o"
    first = run(job(model_dir, tmp_path / "data.parquet", out, id_column="key"))
    assert first["errors"] == 6 and all("cannot read image file" in r["error"] for r in rows_of(out))

    kept = run(job(model_dir, tmp_path / "data.parquet", out, id_column="key", retry_errors=False))
    assert (kept["processed"], kept["retried"], kept["errors"]) == (0, 0, 6)

    images.mkdir()
    for i, r in enumerate(rows):
        (images / f"{i}.png").write_bytes(r["image"])
    second = run(job(model_dir, tmp_path / "data.parquet", out, id_column="key"))
    got = rows_of(out)
    assert sorted(r["input_row"] for r in got) == list(range(6))  # one row per input row, the newest
    assert all(r["error"] is None and r["answer"] is not None for r in got)
    assert (second["rows"], second["errors"], second["retried"], second["processed"], second["errors_this_run"]) \
        == (6, 0, 6, 6, 0)


@pytest.mark.slow
def test_empty_input_and_a_keep_above_the_image_tokens(local_ray, model_dir, data, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(table_of(good_rows(1)).slice(0, 0), empty)
    summary = run(job(model_dir, empty, tmp_path / "o"))
    assert (summary["rows"], summary["processed"]) == (0, 0)
    assert json.loads((tmp_path / "o" / "_summary.json").read_text())["rows"] == 0

    big = run(JobConfig(model=model_dir, input=str(data), output=str(tmp_path / "big"), keep=100000,
                        max_new_tokens=2, limit=4))
    got = rows_of(tmp_path / "big")
    assert big["image_tokens_kept_mean"] == 36.0
    assert all(r["keep"] == r["image_tokens_kept"] == r["image_tokens"] == 36 for r in got)  # what was applied


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_second_run_on_a_held_output_exits_2_naming_the_holder(model_dir, tmp_path):
    rows = good_rows(24)
    write_parquet(rows, tmp_path / "data.parquet")
    out = tmp_path / "o"
    args = ["--model", model_dir, "--input", str(tmp_path / "data.parquet"), "--output", str(out), "--keep", "8",
            "--id-column", "key", "--max-new-tokens", "16", "--batch-size", "2"]
    first = subprocess.Popen([sys.executable, "jobs/caption.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / output.MANIFEST).exists():
        time.sleep(0.05)
    second = caption(*args)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"is held by a running job: pid {first.pid} on {socket.gethostname()}" in lines[0]
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0
    assert json.loads(stdout)["processed"] == 24
    assert sorted(r["id"] for r in rows_of(out)) == sorted(r["key"] for r in rows)
