"""The caption job on video: the synthetic clips through a tiny random LLaVA-OneVision, one row
per input row, answers equal to direct generation on the same frames, and every kind of bad
video an error row in a mixed batch."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig, JobError
from pipeline.demo import clips
from pipeline.job import run
from pipeline.manifest import read_rows
from pipeline.videos import decode_video
from pruner import PrunedVLM
from tiny import audio_only

pytestmark = pytest.mark.timeout(300)


def test_video_flags_are_checked(onevision_dir, model_dir):
    with pytest.raises(JobError, match="--num-frames must be an int >= 1"):
        JobConfig(model=onevision_dir, video_column="video", num_frames=0)
    with pytest.raises(JobError, match="--max-video-seconds must be > 0"):
        JobConfig(model=onevision_dir, video_column="video", max_video_seconds=0)
    with pytest.raises(JobError, match="give --image-column or --video-column, not both"):
        JobConfig(model=onevision_dir, video_column="video", image_column="image")
    with pytest.raises(JobError, match="takes no video"):
        JobConfig(model=model_dir, video_column="video").resolved()  # LLaVA-1.5


@pytest.mark.slow
def test_the_job_answers_videos_as_direct_generation_does(local_ray, onevision_dir, tmp_path):
    good = clips.generate(seed=3, n=4)
    long_clip = clips.encode_video(np.zeros((40, 32, 32, 3), np.uint8), fps=1)  # 40 s
    short = clips.encode_video(np.zeros((3, 32, 32, 3), np.uint8))
    big = clips.encode_video(np.zeros((2, 160, 160, 3), np.uint8))
    bad = [("corrupt", b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50, "corrupt"),
           ("truncated", good[0]["video"][:300], "video"),
           ("not-a-video", b"hello, I am a text file", "not a video"),
           ("audio-only", audio_only(), "no video stream"),
           ("null", None, "missing video (null)"),
           ("too-long", long_clip, "--max-video-seconds"),
           ("too-big", big, "--max-image-pixels")]
    rows = [{"id": r["id"], "video": r["video"], "question": r["question"]} for r in good]
    rows += [{"id": name, "video": data, "question": "what ?"} for name, data, _ in bad]
    rows.append({"id": "short", "video": short, "question": "what ?"})
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "video": pa.array([r["video"] for r in rows], pa.binary()),
                             "question": [r["question"] for r in rows]}), tmp_path / "clips.parquet")
    out = tmp_path / "o"
    cfg = JobConfig(model=onevision_dir, input=str(tmp_path / "clips.parquet"), output=str(out), video_column="video",
                    num_frames=4, max_video_seconds=30, max_image_pixels=150 * 150, keep=12, max_new_tokens=4,
                    batch_size=3)
    summary = run(cfg)
    got = {r["id"]: r for r in read_rows(cfg).to_pylist()}
    assert sorted(got) == sorted(r["id"] for r in rows) and summary["rows"] == len(rows)
    for name, _, message in bad:
        assert got[name]["answer"] is None and message in got[name]["error"], (name, got[name]["error"])
    assert got["short"]["error"] is None and got["short"]["frames"] == 3
    assert got["short"]["note"] == "clip has 3 frames, fewer than the 4 asked: used 3"

    vlm = PrunedVLM.from_pretrained(onevision_dir, method="vlm-pruner", keep=12)
    frames = [decode_video(r["video"], 4).frames for r in good]
    direct = vlm.generate(frames, [r["question"] for r in good], max_new_tokens=4)
    for r, d in zip(good, direct):
        row = got[r["id"]]
        assert (row["answer"], row["frames"], row["image_tokens"], row["image_tokens_kept"]) == \
            (d.text, 4, d.image_tokens, 12)
        assert row["flops_total"] == d.flops.flops_total and row["note"] is None


@pytest.mark.slow
def test_a_folder_of_video_files_is_a_source(local_ray, onevision_dir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for r in clips.generate(seed=5, n=2):
        (folder / f"{r['id']}.mp4").write_bytes(r["video"])
    (folder / "readme.txt").write_text("not a video")
    cfg = JobConfig(model=onevision_dir, input=str(folder), output=str(tmp_path / "o"), num_frames=2, keep=4,
                    max_new_tokens=2)
    summary = run(cfg)
    got = read_rows(cfg).to_pylist()
    assert summary["rows"] == 3 and sorted(r["frames"] or 0 for r in got) == [0, 2, 2]
    assert sorted(r["error"] is None for r in got) == [False, True, True]
