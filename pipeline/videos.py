"""Video cells to uniformly sampled RGB frames, with a clear one-line reason when that is impossible.

The video analogue of `pipeline.images`: a cell holds raw bytes, a `datasets` struct
({"bytes", "path"}) or a path (relative to the dataset, absolute, or a URI), read by
`images.image_bytes`. Decoding is PyAV, in memory. Everything that can be refused from the
container header (no video stream, frame size, duration) is refused before any pixel is
decoded; a clip whose header gives no duration is cut off while demuxing, past the limit.
Memory stays bounded: packets are counted without decoding, then frames are decoded
sequentially and only the sampled ones are converted and kept.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from .common import first_line
from .images import DEFAULT_MAX_PIXELS, BadImage, image_bytes

DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_SECONDS = 600.0


class BadVideo(BadImage):
    """A row's video cannot be used; the message goes to the row's `error` column.

    A subclass of `BadImage`, so code that already turns `BadImage` into an error row
    handles videos unchanged.
    """


@dataclass(frozen=True)
class Clip:
    """Frames sampled from one video.

    frames: uint8 [T, H, W, 3] RGB; indices: the T frame numbers sampled (presentation
    order, from 0); fps: the stream's frame rate (None if unknown); duration: seconds, from
    the header or else frame count / fps (None if neither is known); note: why T differs
    from what was asked, else None.
    """

    frames: np.ndarray
    indices: np.ndarray
    fps: float | None
    duration: float | None
    note: str | None = None


def video_bytes(cell: Any, base_dir: str | None = None) -> bytes:
    """The encoded bytes behind a video cell (same cell kinds as `images.image_bytes`)."""
    try:
        return image_bytes(cell, base_dir)
    except BadVideo:
        raise
    except BadImage as e:  # same reasons, told of a video; the path after " file " is kept as is
        head, sep, tail = str(e).partition(" file ")
        raise BadVideo(re.sub(r"\bimage\b", "video", head) + sep + tail) from None


def sample_indices(n: int, num_frames: int) -> np.ndarray:
    """Frame k of T is the middle frame of the k-th of T equal segments: floor((2k+1) n / 2T).

    Centres rather than ends, so neither the (often black or title) first frame nor the
    last is favoured; with n < T every frame is used once.
    """
    t = min(n, num_frames)
    return (2 * np.arange(t, dtype=np.int64) + 1) * n // (2 * t)


def decode_video(data: bytes, num_frames: int = DEFAULT_NUM_FRAMES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> Clip:
    """Decode `num_frames` frames sampled uniformly (see `sample_indices`) from an encoded video.

    Raises BadVideo for anything that is not a decodable clip within the limits. A clip with
    fewer frames than asked is not an error: all its frames are used, and `note` says so.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    n, fps, duration, (width, height) = _count_frames(data, max_pixels, max_seconds)
    indices = sample_indices(n, num_frames)
    frames = _decode_at(data, indices, width, height, max_pixels)
    note = (f"clip has {n} frame{'s' * (n > 1)}, fewer than the {num_frames} asked: used {n}"
            if n < num_frames else None)
    if duration is None and fps:
        duration = n / fps
    return Clip(frames, indices, fps, duration, note)


def _open(data: bytes) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), "r", metadata_errors="replace")  # corrupt tags are no reason
    except av.FFmpegError as e:
        raise BadVideo(f"not a video, or a corrupt or truncated one: {_reason(e)}") from None
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):  # FFmpeg reads a PNG or JPEG as a 1-frame "video"
        container.close()
        raise BadVideo(f"not a video: the bytes are a still image ({name.removesuffix('_pipe')})")
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise BadVideo(f"no video stream in the container (streams: {kinds})")
    return container


def _count_frames(data: bytes, max_pixels: int,
                  max_seconds: float) -> tuple[int, float | None, float | None, tuple[int, int]]:
    """Frame count, fps, header duration and header frame size, refusing what is over a limit.

    Counts packets (demuxing only, no decoding): headers' frame counts are absent in
    Matroska/WebM and raw streams, and can lie. Past `max_seconds` of packets it stops.
    """
    limit = f"the limit of {max_seconds:g} s (--max-video-seconds)"
    with _open(data) as container:
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for what the header says
            raise BadVideo("corrupt or unsupported video: its stream's codec is unknown")
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(width, height, max_pixels)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else container.duration / av.time_base if container.duration else None)
        if duration is not None and duration > max_seconds:
            raise BadVideo(f"clip is {duration:.1f} s long, above {limit}")
        n, start, last = 0, None, None
        tb = stream.time_base or Fraction(0)
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue  # the end-of-stream flush packet
                n += 1
                if packet.pts is not None and tb:
                    start = packet.pts if start is None else min(start, packet.pts)
                    last = packet.pts if last is None else max(last, packet.pts)
                    seconds = float((packet.pts - start) * tb)
                else:
                    seconds = n / fps if fps else 0.0
                if seconds > max_seconds:
                    raise BadVideo(f"clip runs past {limit}; its header gives no usable duration")
        except av.FFmpegError as e:
            raise BadVideo(f"corrupt or truncated video: {_reason(e)}") from None
        listed = stream.frames
    if n == 0:
        raise BadVideo("video stream has no frames")
    if listed and n < listed:
        raise BadVideo(f"truncated video: {n} of the {listed} frames its header lists")
    covered = float((last - start) * tb) + 1 / (fps or 25) if last is not None else None
    if duration and covered is not None and covered < duration / 2:
        # a gross shortfall only: containers' durations may include other streams or padding
        raise BadVideo(f"truncated video: frames cover {covered:.2f} s of the {duration:.2f} s its header gives")
    return n, fps, duration, (width, height)


def _reason(e: av.FFmpegError) -> str:
    """FFmpeg's own words, without PyAV's "[Errno N] ...: '<none>'" wrapping."""
    return e.strerror or first_line(e)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadVideo(f"video frames are {width}x{height} = {width * height:,} pixels, above the limit of "
                       f"{max_pixels:,} (--max-image-pixels)")


def _decode_at(data: bytes, indices: np.ndarray, width: int, height: int, max_pixels: int) -> np.ndarray:
    """Decode sequentially up to the last wanted frame, converting only the wanted ones.

    Reopens rather than seeks: seeking back fails on raw and truncated streams.
    """
    wanted = set(indices.tolist())
    out: np.ndarray | None = None
    got = 0
    with _open(data) as container:
        stream = container.streams.video[0]
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i not in wanted:
                    continue
                if out is None:  # the header's size, or the first frame's where the header had none
                    width, height = (width, height) if width and height else (frame.width, frame.height)
                    _check_pixels(frame.width, frame.height, max_pixels)
                    out = np.empty((len(indices), height, width, 3), np.uint8)
                out[got] = frame.to_ndarray(format="rgb24", width=width, height=height)
                got += 1
                if got == len(indices):
                    return out
        except av.FFmpegError as e:
            raise BadVideo(f"corrupt or truncated video: {_reason(e)}") from None
    raise BadVideo(f"corrupt or truncated video: fewer frames decode than the {indices[-1] + 1} "
                   "its packets promise")
