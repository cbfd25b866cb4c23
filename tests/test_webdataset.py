"""WebDataset shards in img2dataset's layout: a row a sample key, in shard then member order;
a sample without an image, a corrupt image and a damaged shard as error rows, with nothing
before the damage lost. Tests that start Ray have timeouts."""
import io
import json
import tarfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import tiny
from tiny import png
from pipeline.config import JobConfig
from pipeline.job import run
from pipeline.manifest import read_rows
from pipeline.sources import expand_braces, open_source
from pipeline.webdataset import samples

pytestmark = pytest.mark.timeout(300)


def shard(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> int:
    """A tar of `members`, cut to its first `cut` bytes; returns the whole tar's size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)
    return len(data)


def sample(key: str, seed: int, image: bool = True) -> list[tuple[str, bytes]]:
    meta = {"key": key, "caption": f"caption {seed}", "question": tiny.QUESTIONS[seed % 5], "width": 90}
    return ([(f"{key}.png", png(tiny.image(seed)))] if image else []) + [
        (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", f"caption {seed}".encode())]


def test_braces_expand_in_order_with_their_padding():
    assert expand_braces("s/{0008..0011}.tar") == ["s/0008.tar", "s/0009.tar", "s/0010.tar", "s/0011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]


@pytest.mark.parametrize("cut", [None, -5000, 3 * 1536 + 100, 2 * 1536 + 700, 600, 300])
def test_a_shard_gives_the_same_rows_counted_from_headers_as_read_whole(tmp_path, cut):
    members = [m for i in range(4) for m in sample(f"{i:05d}", i)]
    size = shard(tmp_path / "s.tar", members)
    shard(tmp_path / "s.tar", members, None if cut is None else cut % size)
    fs = pafs.LocalFileSystem()
    size = fs.get_file_info(str(tmp_path / "s.tar")).size
    with fs.open_input_file(str(tmp_path / "s.tar")) as f:
        read = list(samples(f, size))
    with fs.open_input_file(str(tmp_path / "s.tar")) as f:
        headers = list(samples(f, size, read_data=False))
    assert [s["key"] for s in read] == [s["key"] for s in headers]
    damaged = [s for s in read if s["key"] is None]
    assert len(damaged) == (cut is not None) and all("shard damaged after" in s["_error"] for s in damaged)
    if cut is None:
        assert [s["key"] for s in read] == ["00000", "00001", "00002", "00003"]


@pytest.mark.slow
def test_shards_answer_every_sample_in_order_and_errors_are_rows(local_ray, model_dir, tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    shard(shards / "00000.tar", sample("a0", 0) + sample("a1", 1, image=False) + sample("a2", 2))
    corrupt = [(n, b"\x89PNG garbage" if n.endswith(".png") else d) for n, d in sample("b0", 3)]
    shard(shards / "00001.tar", corrupt + sample("b1", 4))
    shard(shards / "00002.tar", sample("c0", 0) + sample("c1", 1))
    cut = (shards / "00002.tar").read_bytes().index(b"c1.png") + 512 + 100  # inside c1's image
    shard(shards / "00002.tar", sample("c0", 0) + sample("c1", 1), cut=cut)
    cfg = dict(model=model_dir, keep=8, max_new_tokens=2, batch_size=4, question_column="question")
    listed = open_source(str(shards / "{00000..00002}.tar"))
    assert (listed.kind, [f.name for f in listed.files]) == ("webdataset", ["00000.tar", "00001.tar", "00002.tar"])
    assert {"caption", "question", "txt", "key", "image"} <= set(listed.column_names())
    summary = run(JobConfig(input=str(shards), output=str(out), **cfg))
    got = sorted(read_rows(JobConfig(output=str(out))).to_pylist(), key=lambda r: r["input_row"])
    assert summary["rows"] == len(got) == 7
    assert [(r["id"], r["source_file"], r["source_row"]) for r in got] == [
        ("a0", "00000.tar", 0), ("a1", "00000.tar", 1), ("a2", "00000.tar", 2),
        ("b0", "00001.tar", 0), ("b1", "00001.tar", 1), ("c0", "00002.tar", 0), (None, "00002.tar", 1)]
    assert [r["error"] is None for r in got] == [True, False, True, False, True, True, False]
    assert "missing image" in got[1]["error"] and "corrupt" in got[3]["error"]
    assert got[6]["error"].startswith("shard damaged after 1 samples")
    assert got[0]["question"] == tiny.QUESTIONS[0] and got[0]["caption"] == "caption 0" and got[0]["txt"] == \
        "caption 0"
    shard(shards / "00003.tar", sample("d0", 5))  # a new shard: only its row is answered
    again = run(JobConfig(input=str(shards), output=str(out), **cfg))
    assert (again["rows"], again["processed"]) == (8, 1 + 3)  # the new row and the three error rows retried


@pytest.mark.slow
def test_the_read_benchmark_reads_and_decodes_every_row_it_wrote(tmp_path, fmt="webdataset"):
    from pipeline.bench.job import bench_read

    from pipeline.bench.scale import check_read

    got = bench_read(250, fmt, rows_per_file=100, output=str(tmp_path / "corpus"))
    assert (got["rows"], got["files"]) == (250, 3) and got["rows_per_second"] > 0
    with pytest.raises(RuntimeError, match="wrote 251 rows but read 250 and decoded 249"):
        check_read(251, 250, 249)  # what measure_read raises, in the benchmark's process, when rows are lost
    check_read(250, 250, 250)
