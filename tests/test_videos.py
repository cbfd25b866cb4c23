"""Video cells to sampled frames: sampling picks the documented frames, every kind of bad video
is one clear reason, the limits hold before decoding; the demo clips are reproducible."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import videos
from pipeline.demo import clips
from pipeline.images import BadImage
from tiny import audio_only
from pipeline.videos import BadVideo, decode_video, video_bytes

# Frame i is flat gray 16 * i, so a decoded frame's mean says which frame it is.
GRAY = np.repeat(16 * np.arange(16, dtype=np.uint8), 32 * 32 * 3).reshape(16, 32, 32, 3)
MP4 = clips.encode_video(GRAY, fps=8)


def frame_numbers(clip: videos.Clip) -> list[int]:
    return np.rint(clip.frames.reshape(len(clip.frames), -1).mean(1) / 16).astype(int).tolist()


@pytest.mark.parametrize("codec, fmt", [("mpeg4", "mp4"), ("libvpx-vp9", "webm"), ("libx264", "h264")])
@pytest.mark.parametrize("num_frames, expected", [
    (4, [2, 6, 10, 14]),  # centres of 4 segments of 4 frames
    (5, [1, 4, 8, 11, 14]),  # floor((2k + 1) * 16 / 10)
    (1, [8]),
    (16, list(range(16))),
])
def test_uniform_sampling_picks_segment_centres(codec, fmt, num_frames, expected):
    """Three containers: MP4 lists its frame count, WebM and a raw H.264 stream do not."""
    clip = decode_video(clips.encode_video(GRAY, 8, codec, fmt), num_frames)
    assert clip.indices.tolist() == expected
    assert frame_numbers(clip) == expected
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (num_frames, 32, 32, 3)
    assert clip.note is None


def test_header_facts():
    clip = decode_video(MP4, 4)
    assert clip.fps == 8.0 and clip.duration == pytest.approx(2.0)


def test_fewer_frames_than_asked_uses_them_all_and_says_so():
    clip = decode_video(clips.encode_video(GRAY[:5]), 8)
    assert frame_numbers(clip) == [0, 1, 2, 3, 4]
    assert clip.note == "clip has 5 frames, fewer than the 8 asked: used 5"


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    return buf.getvalue()


MKV = clips.encode_video(GRAY, 8, "libx264", "matroska")
MKV_HEADER_ONLY = MKV[:MKV.index(b"\x1f\x43\xb6\x75") + 20]  # cut inside the first Cluster: no packets


@pytest.mark.parametrize("data, message", [
    (b"hello, I am a text file", "not a video, or a corrupt or truncated one: Invalid data"),
    (png(), "not a video: the bytes are a still image (png)"),
    (MP4[: len(MP4) // 4], "not a video, or a corrupt or truncated one"),
    (MKV[: len(MKV) * 3 // 4], "truncated video: frames cover"),  # Matroska lists no frame count
    (MKV_HEADER_ONLY, "video stream has no frames"),
    (audio_only(), "no video stream in the container (streams: audio)"),
    (MP4[:40] + bytes(len(MP4) - 40), "not a video, or a corrupt or truncated one"),
])
def test_bad_videos_are_one_line_reasons(data, message):
    with pytest.raises(BadVideo) as err:
        decode_video(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, BadImage)  # the job's existing error-row handling catches it


@pytest.mark.parametrize("codec, fmt", [("mpeg4", "mp4"), ("libx264", "matroska"), ("libx264", "h264")])
def test_cut_or_damaged_bytes_never_crash(codec, fmt):
    """Every cut point and random byte damage: a Clip or a BadVideo, nothing else, no hang."""
    good = clips.encode_video(GRAY, 8, codec, fmt)
    rng = np.random.default_rng(0)
    cases = [good[:k] for k in range(0, len(good), 11)]
    for _ in range(100):
        damaged = np.frombuffer(good, np.uint8).copy()
        at = rng.integers(0, len(good), rng.integers(1, 9))
        damaged[at] = rng.integers(0, 256, len(at))
        cases.append(damaged.tobytes())
    for data in cases:
        try:
            decode_video(data, 4)
        except BadVideo as e:
            assert "\n" not in str(e)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(videos, "_decode_at", lambda *a: pytest.fail("decoded despite the limit"))
    with pytest.raises(BadVideo) as err:
        decode_video(MP4, max_pixels=1000)
    assert str(err.value) == ("video frames are 32x32 = 1,024 pixels, above the limit of 1,000 "
                              "(--max-image-pixels)")


def test_duration_limit_from_the_header(monkeypatch):
    monkeypatch.setattr(videos, "_decode_at", lambda *a: pytest.fail("decoded despite the limit"))
    with pytest.raises(BadVideo) as err:
        decode_video(MP4, max_seconds=1.5)
    assert str(err.value) == "clip is 2.0 s long, above the limit of 1.5 s (--max-video-seconds)"


def test_duration_limit_without_a_header_duration():
    raw = clips.encode_video(GRAY, 8, "libx264", "h264")  # no duration; FFmpeg guesses 25 fps
    assert decode_video(raw, 2).duration == pytest.approx(16 / 25)
    with pytest.raises(BadVideo) as err:
        decode_video(raw, max_seconds=0.5)
    assert "clip runs past the limit of 0.5 s (--max-video-seconds)" in str(err.value)


def test_num_frames_must_be_positive():
    with pytest.raises(ValueError):
        decode_video(MP4, 0)


def test_paths_and_uris_resolve(tmp_path):
    (tmp_path / "v.mp4").write_bytes(MP4)
    assert video_bytes("v.mp4", str(tmp_path)) == MP4
    assert video_bytes(f"file://{tmp_path}/v.mp4") == MP4
    assert video_bytes({"bytes": None, "path": str(tmp_path / "v.mp4")}) == MP4
    assert video_bytes({"bytes": MP4, "path": "elsewhere.mp4"}) == MP4


@pytest.mark.parametrize("cell, message", [
    (None, "missing video (null)"),
    (b"", "empty video bytes"),
    ({"bytes": None, "path": None}, "missing video: the video struct has neither bytes nor a path"),
    ("image/not-there.mp4", "cannot read video file /data/image/not-there.mp4"),  # the path is kept
    (12, "unsupported video cell of type int"),
])
def test_cells_without_bytes_speak_of_videos(cell, message):
    with pytest.raises(BadVideo) as err:
        video_bytes(cell, "/data")
    assert message in str(err.value)


def test_clips_are_reproducible_and_answerable():
    rows = clips.generate(seed=3, n=8)
    assert rows == clips.generate(seed=3, n=8)  # same bytes, not just the same frames
    assert [r["video"] for r in rows] != [r["video"] for r in clips.generate(seed=4, n=8)]
    assert {r["question_type"] for r in rows} == set(clips.QUESTION_TYPES)
    for row, (story, *_) in zip(rows, clips.samples(3, 8)):
        clip = decode_video(row["video"], 8)
        assert clip.frames.shape == (8, clips.SIZE, clips.SIZE, 3) and clip.note is None
        expected = clips.render_frames(story)[clip.indices]
        assert np.abs(clip.frames.astype(int) - expected).mean() < 4  # lossy, but the drawn scene
        assert len(row["video"]) < 10_000


def test_motion_answers_match_the_pixels():
    """The named object's colour centroid moves the way the answer says, in decoded frames."""
    checked = 0
    for row, (story, qtype, _, answer) in zip(clips.generate(1, 24), clips.samples(1, 24)):
        if qtype != "motion":
            continue
        color = row["question"].split()[4]  # "which direction does the <color> <shape> move?"
        frames = decode_video(row["video"], 2).frames.astype(int)
        mask = np.abs(frames - np.array(clips.COLORS[color])).sum(-1) < 60
        ys, xs = [np.array([np.nonzero(m)[k].mean() for m in mask]) for k in (0, 1)]
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == answer, row["question"]
        checked += 1
    assert checked >= 5


def test_cli_writes_the_parquet(tmp_path):
    out = tmp_path / "clips.parquet"
    subprocess.run([sys.executable, "-m", "pipeline.demo.clips", "--seed", "1", "--n", "4", "--out", str(out)],
                   check=True, capture_output=True, cwd=Path(__file__).parents[1])
    table = pq.read_table(out)
    assert table.schema == pa.schema([("id", pa.string()), ("video", pa.binary()), ("question", pa.string()),
                                      ("answer_gt", pa.string()), ("question_type", pa.string())])
    assert table.column("video").to_pylist() == [r["video"] for r in clips.generate(1, 4)]
    assert table.column("id").to_pylist()[0] == "clip-1-00000"
