"""The caption job: one output row per input row, bad rows as error rows, every source kind,
resume, and the command line. Tests that start Ray have timeouts."""
import argparse
import io
import json
import os
import platform
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import tiny
from tiny import good_rows, png, table_of, write_parquet
from pipeline import output
from pipeline.config import ANSWER_FIELDS, JobConfig, JobError, add_job_arguments, job_kwargs, parse_method_params
from pipeline.job import actor_threads, columns, cpu_actor_env, pipeline, run
from pipeline.manifest import read_rows
from pipeline.inputs import plan_inputs
from pipeline.sources import open_source
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.stages import AnswerConfig, Answerer, length_batches
from pipeline.workarounds import stage_compute
from pruner import PrunedVLM

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def bad_rows(tmp_path: Path) -> list[dict]:
    (tmp_path / "notes.txt").write_text("not an image")
    rgba = png(Image.new("RGBA", (30, 30), (0, 0, 255, 128)))
    sixteen = png(Image.new("I;16", (30, 30)))
    cmyk = png(Image.new("CMYK", (30, 30), (0, 100, 0, 0)), "JPEG")
    rows = [
        ("corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "corrupt or truncated image"),
        ("truncated", png(tiny.image(99))[:200], "corrupt or truncated image"),
        ("empty", b"", "empty image bytes"),
        ("null", None, "missing image (null)"),
        ("missing-path", "no/such/file.png", "cannot read image file"),
        ("not-image-file", "notes.txt", "not an image"),
        ("bomb", png(Image.new("L", (2000, 1500))), "above the limit of 1,000,000"),
        ("rgba", rgba, None), ("sixteen", sixteen, None), ("cmyk", cmyk, None),
    ]
    return [{"key": k, "image": v, "question": "what ?", "label": -1, "_expect": e} for k, v, e in rows]


# ---------------------------------------------------------------- stages, without Ray


def test_a_bad_row_never_fails_its_batch(model_dir, tmp_path):
    bad = bad_rows(tmp_path)
    rows = good_rows(3) + bad
    table = table_of(rows)
    table = table.append_column("input_row", pa.array(range(len(rows)), pa.int64()))
    staged = tiny.preparer(model_dir, str(tmp_path))(table)
    out = tiny.answerer(model_dir, keep=8, max_new_tokens=4)(staged)
    assert out.num_rows == len(rows)
    assert out.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert out.select(OUTPUT_SCHEMA.names).schema.equals(OUTPUT_SCHEMA)
    assert out.column("label").to_pylist() == [r["label"] for r in rows]  # pass-through, in order
    assert out.column("input_row").to_pylist() == list(range(len(rows)))
    got = {r["id"]: r for r in out.to_pylist()}
    for r in bad:
        if r["_expect"] is None:
            assert got[r["key"]]["error"] is None and got[r["key"]]["answer"] is not None, r["key"]
        else:
            assert r["_expect"] in got[r["key"]]["error"] and got[r["key"]]["answer"] is None, r["key"]
    vlm = PrunedVLM.from_pretrained(model_dir, method="vlm-pruner", keep=8)
    direct = vlm.generate([tiny.image(i) for i in range(3)], tiny.QUESTIONS[:3], max_new_tokens=4)
    for i in range(3):
        row = got[f"r{i}"]
        assert row["answer"] == direct[i].text and row["error"] is None
        assert (row["image_tokens"], row["image_tokens_kept"]) == (36, 8)


def test_length_batches_group_by_length_and_keep_every_row_once():
    assert length_batches([5, 3, 5, 1, 3, 9, 3], 3) == [[3, 1, 4], [6, 0, 2], [5]]  # ties in order
    assert length_batches([2, 1], 8) == [[1, 0]] and length_batches([], 4) == []
    lengths = [(i * 7919) % 13 for i in range(50)]
    batches = length_batches(lengths, 4)
    assert sorted(i for b in batches for i in b) == list(range(50))  # none dropped, none twice
    assert all(len(b) <= 4 for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)


def test_a_call_regroups_rows_by_prompt_length_and_answers_in_input_order(model_dir, tmp_path):
    rows = good_rows(7)  # five questions of different lengths, repeated
    table = table_of(rows).append_column("input_row", pa.array(range(7), pa.int64()))
    staged = tiny.preparer(model_dir, str(tmp_path))(table)
    answerer = tiny.answerer(model_dir, keep=8, max_new_tokens=4, batch_size=2)
    generate, batches = answerer.vlm.generate_prepared, []
    answerer.vlm.generate_prepared = lambda s, *a, **k: batches.append([len(x.input_ids) for x in s]) or generate(
        s, *a, **k)
    out = answerer(staged)
    assert [len(b) for b in batches] == [2, 2, 2, 1]  # one call of 7 rows, in model batches of 2
    flat = [n for b in batches for n in b]
    assert flat == sorted(flat) and len(set(flat)) > 1  # grouped by prompt length, which differ
    assert out.column("id").to_pylist() == [r["key"] for r in rows]
    vlm = PrunedVLM.from_pretrained(model_dir, method="vlm-pruner", keep=8)
    alone = [vlm.generate([tiny.image(i)], [r["question"]], max_new_tokens=4)[0].text for i, r in enumerate(rows)]
    assert out.column("answer").to_pylist() == alone


# ---------------------------------------------------------------- the job on local Ray


def job(model_dir: str, **kw) -> JobConfig:
    return JobConfig(model=model_dir, keep=8, max_new_tokens=3, batch_size=4, **kw)


def output_rows(out: Path) -> list[dict]:
    """The job's own rows in `out` (never another file there)."""
    return read_rows(JobConfig(output=str(out))).to_pylist()


def test_every_source_kind_gives_one_row_per_input_row(local_ray, model_dir, tmp_path):
    import datasets

    rows = good_rows(5)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(rows[:3], parts / "part-0.parquet")
    write_parquet(rows[3:], parts / "part-1.parquet")
    hf = datasets.Dataset.from_dict(
        {"image": [tiny.image(i) for i in range(4)], "question": tiny.QUESTIONS[:4], "label": list(range(4))},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))
    hf.save_to_disk(str(tmp_path / "hf"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(tiny.image(i)))
    (folder / "readme.txt").write_text("not an image")

    cases = [
        (str(parts / "part-0.parquet"), {"id_column": "key"}, 3),
        (str(parts), {"id_column": "key"}, 5),
        (str(parts / "part-*.parquet"), {"id_column": "key"}, 5),
        (str(tmp_path / "hf"), {}, 4),
        (str(folder), {}, 4),
    ]
    for i, (uri, extra, n) in enumerate(cases):
        out = tmp_path / f"out{i}"
        summary = run(job(model_dir, input=uri, output=str(out), **extra))
        got = output_rows(out)
        assert len(got) == n == summary["rows"] == summary["processed"], uri
        assert len({r["id"] for r in got}) == n
    folder_rows = output_rows(tmp_path / "out4")
    assert sorted(r["error"] is None for r in folder_rows) == [False, True, True, True]
    assert all(r["question"] == "Describe the image briefly." for r in folder_rows)
    hf_rows = output_rows(tmp_path / "out3")
    assert sorted(r["label"] for r in hf_rows) == [0, 1, 2, 3]


def test_rows_are_numbered_in_read_order_even_when_the_current_context_does_not_keep_order(
        local_ray, model_dir, tmp_path, monkeypatch):
    """A Ray dataset copies the current Ray Data context when it is read, so order is set on
    the job's dataset, not the current context (which is left as it was): rows are numbered in
    read order even in a fresh process whose context does not keep order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx.execution_options, "preserve_order", False)  # a fresh process
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(4):
        write_parquet(good_rows(3, start=3 * i), parts / f"part-{i}.parquet")
    cfg = job(model_dir, input=str(parts), output=str(tmp_path / "out"), id_column="key")
    source = open_source(cfg.input)
    plan = pipeline(cfg, source, plan_inputs(source, None), columns(cfg, source), "not-read")
    assert plan.context.execution_options.preserve_order
    assert not ctx.execution_options.preserve_order
    # and the numbering actor gets one block at a time: Ray Data lets an actor run queued tasks
    # out of order, even with order kept
    assert stage_compute(plan, "MapBatches(Numberer)").max_tasks_in_flight_per_actor == 1
    run(cfg)
    got = output_rows(tmp_path / "out")
    assert sorted((r["input_row"], r["label"]) for r in got) == [(i, i) for i in range(12)]


@pytest.mark.parametrize("files, users_choice, v2, bars", [(1, True, False, False), (16, True, False, False),
                                                         (17, True, True, True), (17, False, False, True)])
def test_a_few_parquet_files_are_read_without_footer_reading_actors(local_ray, tmp_path, monkeypatch, files,
                                                                    users_choice, v2, bars):
    """Ray's newer Parquet reader starts actors whose start-up delays the model actor's on a
    small machine; it is kept for many files. The older one reads without its sampling bar, and
    the user's settings are restored after; the dataset keeps showing the job's progress bars."""
    import ray.data

    from pipeline import sources

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", users_choice)
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    seen = []
    real = ray.data.read_parquet

    def spy(paths, **kw):
        seen.append((ctx.use_datasource_v2, ctx.enable_progress_bars))
        return real(paths, **kw)

    monkeypatch.setattr(sources.ray.data, "read_parquet", spy)
    paths = []
    for i in range(files):
        write_parquet(good_rows(1, start=i), tmp_path / f"part-{i}.parquet")
        paths.append(str(tmp_path / f"part-{i}.parquet"))
    ds = sources.read_parquet(paths)
    assert seen == [(v2, bars)]
    assert (ctx.use_datasource_v2, ctx.enable_progress_bars) == (users_choice, True)
    assert ds.context.enable_progress_bars and ds.count() == files


def test_bad_rows_and_resume(local_ray, model_dir, tmp_path):
    rows = good_rows(6) + bad_rows(tmp_path)
    data = tmp_path / "data.parquet"
    write_parquet(rows, data)
    out = tmp_path / "out"
    first = run(job(model_dir, input=str(data), output=str(out), id_column="key", limit=8, max_image_pixels=1_000_000))
    assert (first["rows"], first["processed"], first["skipped"]) == (8, 8, 0)
    job_id = json.loads((out / "_job.json").read_text())["job_id"]
    half = out / f"labels-{job_id}-r0001-0dead0-000001.parquet"
    half.write_bytes(b"PAR1 truncated")  # what a kill can leave
    second = run(job(model_dir, input=str(data), output=str(out), id_column="key", max_image_pixels=1_000_000))
    # the first run's 2 error rows are retried, its 6 good rows skipped
    assert (second["rows"], second["processed"], second["skipped"], second["retried"]) == (len(rows), len(rows) - 6, 6, 2)
    assert first["errors"] == 2 and second["errors"] == second["errors_this_run"] == 7
    assert len(second["moved_aside"]) == 1 and not half.exists()
    got = output_rows(out)
    assert sorted(r["id"] for r in got) == sorted(r["key"] for r in rows)
    expected = {r["key"]: r.get("_expect") for r in rows}
    for r in got:
        if expected[r["id"]] is None:
            assert r["error"] is None and r["answer"] is not None
        else:
            assert expected[r["id"]] in r["error"] and r["answer"] is None
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["image_tokens_kept_mean"] == 8.0


# Loaded first by the model actor's Python (a `sitecustomize` on its path only): every batch of
# more than one row fails as a whole, as one too large for a GPU's memory does.
BATCHES_FAIL = """
from pruner.vlm import PrunedVLM

plain = PrunedVLM.generate_prepared


def generate_prepared(self, samples, *args, **kwargs):
    if len(samples) > 1:
        raise RuntimeError("CUDA out of memory (a test's stand-in)")
    return plain(self, samples, *args, **kwargs)


PrunedVLM.generate_prepared = generate_prepared
"""


@pytest.mark.slow
def test_batches_that_fail_as_a_whole_are_counted_and_told_and_each_row_is_answered_alone(
        local_ray, model_dir, tmp_path, monkeypatch, capsys):
    import pipeline.job

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(BATCHES_FAIL)
    path = os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])
    monkeypatch.setattr(pipeline.job, "cpu_actor_env", lambda threads: {**cpu_actor_env(threads), "PYTHONPATH": path})
    rows = good_rows(8)
    write_parquet(rows, tmp_path / "data.parquet")
    out = tmp_path / "out"
    summary = run(job(model_dir, input=str(tmp_path / "data.parquet"), output=str(out), id_column="key"))
    assert (summary["rows"], summary["errors"], summary["batches_retried_per_row"]) == (8, 0, 2)  # 2 batches of 4
    assert ("warning: 2 model batches failed as a whole and were retried row by row, which is slower (out of memory? "
            "a smaller --batch-size may help): see batches_retried_per_row in _summary.json") in capsys.readouterr().err
    vlm = PrunedVLM.from_pretrained(model_dir, keep=8)
    got = {r["id"]: r["answer"] for r in output_rows(out)}
    for r in rows:
        assert got[r["key"]] == vlm.generate([Image.open(io.BytesIO(r["image"]))], [r["question"]],
                                             max_new_tokens=3)[0].text
    assert json.loads((out / "_summary.json").read_text())["batches_retried_per_row"] == 2


@pytest.mark.parametrize("cpus", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_model_actors_never_leave_whole_cpu_tasks_without_a_cpu_nor_fill_the_node(cpus, concurrency):
    """Ray Data warned "will hang" when it saw no CPU free (actor and last write task held a
    2-core node); with whole-CPU actors, --concurrency 2 on 2 cores left the read task none."""
    import math

    from pipeline.job import model_actor_cpus

    reserved = model_actor_cpus(cpus, concurrency) * concurrency
    assert reserved % 1 == pytest.approx(0.5) and cpus - math.ceil(reserved) >= 1
    assert math.ceil(reserved) == min(concurrency, cpus - 1)  # tasks get as many CPUs as before


def test_cpu_actors_use_the_nodes_cores(model_dir):
    """Ray pins an actor's OMP_NUM_THREADS to its reserved CPUs (1); the model must not run on
    one thread of a multi-core node (it made the job 0.47x a plain loop on 2 cores)."""
    assert actor_threads(JobConfig(), cpus=2.0) == 2
    assert actor_threads(JobConfig(concurrency=2), cpus=8.0) == 4
    assert actor_threads(JobConfig(concurrency=4), cpus=2.0) == 1
    assert actor_threads(JobConfig(threads_per_actor=3), cpus=2.0) == 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tiny.answerer(model_dir, threads=2, keep=8, max_new_tokens=4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the variables are glibc's")
def test_the_cpu_model_actors_environment_keeps_freed_memory_instead_of_faulting_it_in_again():
    """Each batch frees and reallocates activations of tens of MB; by default glibc returns
    them to the kernel and the next batch page-faults them in again (~10 % of the model's
    time on the demo). The actor's environment keeps them: after the first round, the same
    tensors cost (almost) no page faults, against one per 4 KiB page without it."""
    code = ("import resource, torch\n"
            "def faults():\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(8):\n"
            "        x = torch.ones(8192, 1024); y = x * 2; z = x + y; del x, y, z  # 32 MiB each\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
            "faults(); print(faults())")

    def faults(env: dict[str, str]) -> int:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    plain, kept = faults({}), faults(cpu_actor_env(1))
    assert plain >= 8 * 32 * 2**20 // 4096  # at least a tensor's pages in every round
    assert kept < plain / 10


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, message", [
    (["--input", "/no/such/place.parquet"], "input not found: /no/such/place.parquet"),
    (["--image-column", "picture"], "--image-column 'picture' is not a column of"),
    (["--keep", "0"], "--keep must be an int >= 1, got 0"),
    (["--rate", "1.5"], "--rate must be in [0, 1)"),
    (["--prune-layer", "9"], "--prune-layer must be in [1, 3]"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["--threads-per-actor", "0"], "--threads-per-actor must be an int >= 1"),
    (["--keep", "8", "--rate", "0.5"], "give --keep or --rate, not both"),
    (["--method-param", "foo=1"], "method 'vlm-pruner' has no parameter(s) foo; it takes: official, pivots"),
    (["--method", "fastv", "--method-param", "tau=0.7"], "method 'fastv' has no parameter(s) tau; it takes: none"),
    (["--method-param", "tau"], "--method-param takes NAME=VALUE, got 'tau'"),
    (["--method-param", "tau=0.7", "--method-param", "tau=0.8"], "--method-param tau is given twice"),
])
def test_bad_arguments_fail_fast_with_one_line(local_ray, model_dir, args, message, capsys, tmp_path):
    caption = runpy.run_path(str(ROOT / "jobs" / "caption.py"))  # the file a user runs, in this process

    code = caption["main"](["--model", model_dir, "--output", str(tmp_path / "never"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, line", [
    (["--keep", "0"], "caption.py: error: --keep must be an int >= 1, got 0"),
    # found only once Ray has started and the input is opened: nothing Ray prints comes first
    (["--image-column", "picture"], "caption.py: error: --image-column 'picture' is not a column of {input}; "
                                    "columns: key, image, question, label"),
])
def test_the_command_line_exits_non_zero_with_one_line(model_dir, tmp_path, args, line):
    data = tmp_path / "data.parquet"
    write_parquet(good_rows(2), data)
    proc = subprocess.run([sys.executable, "jobs/caption.py", "--model", model_dir, "--input", str(data),
                           "--output", str(tmp_path / "out"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line.format(input=data)]


def test_the_flags_and_the_answer_fields_come_from_the_configurations_fields():
    assert ANSWER_FIELDS == ("input", "split", "revision", "model", "method", "keep", "rate", "prune_layer",
                             "method_params", "max_new_tokens", "temperature", "top_p", "seed", "question",
                             "image_column", "video_column", "question_column", "id_column", "max_image_pixels",
                             "num_frames", "max_video_seconds")  # the manifest's config, in its order
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(flags) == [f.name for f in fields(JobConfig)]  # every field a flag, with its help
    assert all(a.help and "{" not in a.help and a.default is None for a in flags.values())
    assert flags["method_params"].option_strings == ["--method-param"]
    assert (flags["keep"].type, flags["rate"].type, flags["question"].type) == (int, float, None)
    assert flags["max_image_pixels"].help.endswith("(default: 40,000,000)")
    assert flags["question"].help.endswith("(default: 'Describe the image briefly.')")


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("8", 8), ("-2", -2), ("0.7", 0.7),
                                         ("1e-3", 0.001), ("torch", "torch")])
def test_a_method_params_value_reads_as_a_bool_int_float_or_text(text, value):
    got = parse_method_params([f"name={text}"])["name"]
    assert got == value and type(got) is type(value)


def test_method_params_on_the_command_line_reach_the_method_and_the_manifest(local_ray, model_dir, tmp_path,
                                                                             capsys):
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    given = ["--method-param", "chunk=4", "--method-param", "tau=0.7"]
    cfg = JobConfig(model=model_dir, keep=8, **job_kwargs(parser.parse_args(given))).resolved()
    assert Answerer(AnswerConfig.of(cfg)).vlm.plan.params == {"chunk": 4, "tau": 0.7}

    caption = runpy.run_path(str(ROOT / "jobs" / "caption.py"))
    data, out = tmp_path / "data.parquet", tmp_path / "out"
    write_parquet(good_rows(2), data)
    args = ["--model", model_dir, "--input", str(data), "--output", str(out), "--keep", "8", "--max-new-tokens", "2"]
    assert caption["main"]([*args, *given]) == 0
    assert json.loads((out / output.MANIFEST).read_text())["config"]["method_params"] == {"chunk": 4, "tau": 0.7}
    capsys.readouterr()
    assert caption["main"]([*args, *given[:2]]) == 2  # they decide the answers: a rerun without one is refused
    assert "method_params: {'chunk': 4, 'tau': 0.7} -> {'chunk': 4}" in capsys.readouterr().err


def test_unknown_method_and_unsupported_model_fail_fast(tmp_path):
    bad = subprocess.run([sys.executable, "jobs/caption.py", "--method", "sparsevlm"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'sparsevlm'" in bad.stderr
    from transformers import LlamaConfig
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(JobError, match="unsupported model architecture 'llama'"):
        run(JobConfig(model=str(tmp_path)))


# ---------------------------------------------------------------- kill and resume


def test_sigkill_mid_job_then_rerun_gives_each_row_exactly_once(local_ray, model_dir, tmp_path):
    rows = good_rows(40)
    data = tmp_path / "data.parquet"
    write_parquet(rows, data)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/caption.py", "--model", model_dir, "--input", str(data), "--output", str(out),
           "--id-column", "key", "--keep", "8", "--max-new-tokens", "16", "--batch-size", "2",
           "--rows-per-file", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and len(list(out.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(output_rows(out))
    assert 0 < written < 40, written
    run(tiny.caption_config(cmd[2:]))  # the same command's configuration, in this process
    summary = json.loads((out / "_summary.json").read_text())
    ids = [r["id"] for r in output_rows(out)]
    assert sorted(ids) == sorted(r["key"] for r in rows)  # none lost, none doubled
    assert summary["skipped"] >= written and summary["rows"] == 40


def test_the_demo_job_end_to_end_matches_direct_generation(local_ray, tmp_path):
    """No arguments but a limit: the bundled demo data through the bundled model, VLM-Pruner
    keep 64; every answer equals PrunedVLM.generate on the same rows."""
    from pipeline.demo import EVAL_PARQUET, MODEL_DIR

    cfg = JobConfig(output=str(tmp_path / "out"), limit=12)
    summary = run(cfg)
    assert (summary["rows"], summary["errors"], summary["image_tokens_kept_mean"]) == (12, 0, 64.0)
    assert 0 < summary["flops_saved_pct"] < 100
    got = {r["id"]: r for r in output_rows(tmp_path / "out")}
    first = pq.read_table(EVAL_PARQUET).slice(0, 12).to_pylist()
    assert sorted(got) == sorted(r["id"] for r in first)  # the input's own ids, the first 12 rows
    vlm = PrunedVLM.from_pretrained(str(MODEL_DIR), method="vlm-pruner", keep=64)
    images = [Image.open(io.BytesIO(r["image"])) for r in first]
    direct = vlm.generate(images, [r["question"] for r in first], max_new_tokens=cfg.max_new_tokens)
    for row, out in zip(first, direct):
        assert got[row["id"]]["answer"] == out.text
        assert got[row["id"]]["answer_gt"] == row["answer_gt"]  # pass-through
        assert got[row["id"]]["flops_total"] == out.flops.flops_total
