"""Procedural video-QA clips: shapes moving in straight lines on a plain background.

The moving counterpart of `pipeline.demo.scenes` (same shapes, colours and backgrounds, drawn
by its code). Each object moves left, right, up or down at a constant speed, so "which way
does the red circle move?" needs at least two sampled frames. Everything is derived from a
seed: the same seed gives the same frames anywhere, and the same MP4 bytes with the same
PyAV wheel (see `encode_video`; another FFmpeg build may encode the same frames to other bytes).

CLI: ``python -m pipeline.demo.clips --seed 1 --n 40 --out PATH`` (one Parquet file).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import random
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw

from . import scenes
from .scenes import BACKGROUNDS, COLOR_NAMES, COLORS, RADIUS, SHAPE_NAMES, Obj, _draw, write

SIZE = 112  # 8x8 patches of 14 px; a multiple of 16, so yuv420p needs no padding
FRAMES = 16
FPS = 8
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = (2, 3)  # pixels per frame: 30-45 px over a clip, unmistakable between sampled frames
QUESTION_TYPES = ("motion", "color", "shape", "count")


@dataclass(frozen=True)
class Mover:
    obj: Obj  # position in the first frame
    direction: str
    speed: int

    def at(self, t: int) -> Obj:
        dx, dy = DIRECTIONS[self.direction]
        return dataclasses.replace(self.obj, cx=self.obj.cx + dx * self.speed * t,
                                   cy=self.obj.cy + dy * self.speed * t)


@dataclass(frozen=True)
class Story:
    background: tuple[int, int, int]
    movers: tuple[Mover, ...]


def sample_story(rng: random.Random, max_objects: int = 3) -> Story:
    """1..max_objects objects, distinct colours; each stays wholly inside the frame throughout.

    Objects may cross each other (drawn in order, the later on top); questions never depend
    on occlusion, and crossings last a few frames at most.
    """
    movers = []
    for color in rng.sample(COLOR_NAMES, rng.randint(1, max_objects)):
        size = rng.choice(("small", "large"))
        r = rng.randint(*RADIUS[size])
        direction, speed = rng.choice(tuple(DIRECTIONS)), rng.choice(SPEEDS)
        travel = speed * (FRAMES - 1)
        dx, dy = DIRECTIONS[direction]
        # start so that start and end both lie in [r, SIZE - 1 - r] along the moving axis
        lo, hi = r + max(0, -dx, -dy) * travel, SIZE - 1 - r - max(0, dx, dy) * travel
        along, across = rng.randint(lo, hi), rng.randint(r, SIZE - 1 - r)
        cx, cy = (along, across) if dx else (across, along)
        movers.append(Mover(Obj(rng.choice(SHAPE_NAMES), color, size, cx, cy, r), direction, speed))
    return Story(rng.choice(BACKGROUNDS), tuple(movers))


def render_frames(story: Story) -> np.ndarray:
    """uint8 [FRAMES, SIZE, SIZE, 3], aliased drawing (few colours: small, clean encodes)."""
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(FRAMES):
        img = Image.new("RGB", (SIZE, SIZE), story.background)
        draw = ImageDraw.Draw(img)
        for m in story.movers:
            _draw(draw, m.at(t), COLORS[m.obj.color])
        frames[t] = np.asarray(img)
    return frames


def encode_video(frames: np.ndarray, fps: int = FPS, codec: str = "mpeg4", fmt: str = "mp4") -> bytes:
    """uint8 [T, H, W, 3] to MPEG-4 Part 2 in MP4 (by default), in memory.

    FFmpeg's own mpeg4 encoder, not libx264: x264's bytes vary with the process's heap state
    (same frames, same process, other bytes after unrelated allocations), while mpeg4's are
    reproducible. Bit-exact flags keep FFmpeg's version string out of the bytes.
    """
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 400_000  # a cap the flat clips never reach: ~4 KB, colours within a few levels
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for t, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = t  # in 1/fps, the stream's codec time base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def question(story: Story, rng: random.Random, qtype: str) -> tuple[str, str] | None:
    """One (question, answer) of the given type, or None where the type has no valid question.

    Colour and shape questions are the still scenes' (`scenes.questions`) about the first frame.
    """
    if qtype == "motion":
        m = rng.choice(story.movers)
        return f"which direction does the {m.obj.color} {m.obj.shape} move?", m.direction
    if qtype == "count":
        return "how many objects are there?", str(len(story.movers))
    if qtype in ("color", "shape"):
        return scenes.questions(scenes.Scene(story.background, tuple(m.obj for m in story.movers)), rng, qtype)
    raise ValueError(qtype)


def samples(seed: int, n: int, types: tuple[str, ...] = QUESTION_TYPES, max_objects: int = 3):
    """Yield n (story, question_type, question, answer): clip i asks types[i % len(types)], or
    the next type that has a question for that clip (motion, shape and count always do)."""
    rng = random.Random(seed)
    for i in range(n):
        story = sample_story(rng, max_objects)
        order = types[i % len(types):] + types[:i % len(types)]
        yield next((story, t, *qa) for t in order if (qa := question(story, rng, t)) is not None)


def generate(seed: int, n: int, types: tuple[str, ...] = QUESTION_TYPES, max_objects: int = 3) -> list[dict]:
    """n dataset rows: id, video (MP4 bytes), question, answer_gt, question_type."""
    return [{"id": f"clip-{seed}-{i:05d}", "video": encode_video(render_frames(story)), "question": q,
             "answer_gt": a, "question_type": qtype}
            for i, (story, qtype, q, a) in enumerate(samples(seed, n, types, max_objects))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--out", required=True, help="Parquet file path")
    a = p.parse_args()
    print(write(generate(a.seed, a.n), a.out))


if __name__ == "__main__":
    main()
