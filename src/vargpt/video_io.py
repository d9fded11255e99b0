"""Video files (paths or bytes) decoded with PyAV into the RGB frames Qwen2-VL's video path reads.

Frames are chosen as qwen-vl-utils' `fetch_video` chooses them, the sampling Qwen2-VL was trained with: 2 frames per
second of video, at least 4 and at most 768 frames, an even count (frames are paired into temporal patches), taken
at `linspace(0, total - 1, count)` rounded; each frame is then resized (PIL bicubic) to Qwen2-VL's grid within a
pixel budget that shrinks as frames grow in number (`VideoSampling.frame_max_pixels`). `VideoSampling` exposes
every one of those settings.

Videos come from users and datasets, so decoding is bounded before it starts: the container is recognised from
its first bytes and only MP4/QuickTime, Matroska/WebM, GIF and AVI are opened (FFmpeg knows playlist formats such as
HLS and concat that would open other files or URLs); the frame size is checked from the stream's header and the
frame count by reading packets (no decoding) before a frame is decoded; and decoding keeps only the sampled frames
and stops after the last one. Every bad input raises `ImageInputError` naming the problem.

PyAV is imported only when a video file is decoded (`pip install "vargpt[video]"`); torchvision is never needed.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .image_io import DEFAULT_MAX_PIXELS, ImageInputError, existing_file

VideoFile = str | os.PathLike | bytes

# qwen-vl-utils' defaults (vision_process.py): FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES, FRAME_FACTOR, VIDEO_MIN_PIXELS,
# VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS; the grid factor is the ViT patch (14) times the merge size (2).
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
FRAME_FACTOR = 2
GRID_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
# Frames in the file (not sampled ones) beyond which a video is refused: an hour at 30 frames per second.
DEFAULT_MAX_SOURCE_FRAMES = 108_000

# Container families we open, by the name callers use, with the FFmpeg demuxer that reads them.
VIDEO_FORMATS = {"mp4": "mov", "matroska": "matroska", "gif": "gif", "avi": "avi"}
_QUICKTIME_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
_HEADER_BYTES = 12


def _multiple_of(value: float, factor: int, rounding: Any) -> int:
    return int(rounding(value / factor) * factor)


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video file the model sees and how large (qwen-vl-utils' settings and defaults).

    `num_frames` fixes the frame count (rounded to an even number) instead of deriving it from `fps`.
    `min_pixels` / `max_pixels` bound each frame's area after resizing; `total_pixels` is the budget of the whole
    video, shared by its frames (each gets at most `total_pixels / count * 2`, never below 1.05 x `min_pixels`).
    """

    fps: float = VIDEO_FPS
    min_frames: int = VIDEO_MIN_FRAMES
    max_frames: int = VIDEO_MAX_FRAMES
    num_frames: int | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int = VIDEO_TOTAL_PIXELS

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        for name in ("min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_frames < FRAME_FACTOR:
            raise ValueError(f"max_frames must be at least {FRAME_FACTOR} (frames are paired), got {self.max_frames}")
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) exceeds max_frames ({self.max_frames})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < FRAME_FACTOR):
            raise ValueError(f"num_frames must be an integer >= {FRAME_FACTOR}, got {self.num_frames!r}")

    def frame_count(self, total_frames: int, video_fps: float | None) -> int:
        """How many frames to take from a video of `total_frames` frames at `video_fps` (None: unknown, read as
        already at `fps`). qwen-vl-utils' `smart_nframes`: an even count within [min_frames, max_frames] and at
        most the video's own frames."""
        if self.num_frames is not None:
            count = _multiple_of(self.num_frames, FRAME_FACTOR, round)
        else:
            low = _multiple_of(self.min_frames, FRAME_FACTOR, math.ceil)
            high = _multiple_of(min(self.max_frames, total_frames), FRAME_FACTOR, math.floor)
            wanted = total_frames / video_fps * self.fps if video_fps else total_frames
            count = _multiple_of(min(max(wanted, low), high, total_frames), FRAME_FACTOR, math.floor)
        if not FRAME_FACTOR <= count <= total_frames:
            raise ImageInputError(
                f"cannot take {count} frames from a video of {total_frames} frame(s): a video needs at least "
                f"{FRAME_FACTOR} frames, and num_frames at most the video's"
            )
        return count

    def frame_indices(self, total_frames: int, video_fps: float | None) -> list[int]:
        """The sampled frames' indices, evenly spread from the first frame to the last."""
        count = self.frame_count(total_frames, video_fps)
        return np.rint(np.linspace(0, total_frames - 1, count)).astype(int).tolist()

    def frame_max_pixels(self, count: int) -> int:
        """Each frame's pixel budget when `count` frames share `total_pixels`."""
        share = self.total_pixels / count * FRAME_FACTOR
        return max(min(self.max_pixels, int(share)), int(self.min_pixels * 1.05))

    def frame_size(self, width: int, height: int, count: int) -> tuple[int, int]:
        """(width, height) of a frame after resizing onto Qwen2-VL's grid within this sampling's pixel bounds."""
        try:
            new_height, new_width = smart_resize(
                height, width, GRID_FACTOR, self.min_pixels, self.frame_max_pixels(count)
            )
        except ValueError as error:
            raise ImageInputError(f"video frames of {width}x{height} cannot be resized: {error}") from None
        return new_width, new_height


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header and packets say, read before any frame is decoded."""

    container: str  # a key of VIDEO_FORMATS
    codec: str
    width: int
    height: int
    frames: int  # video packets in the file: one per frame for the formats we open
    fps: float | None  # None when the file does not say


def _av() -> Any:
    try:
        import av
    except ImportError as error:
        raise ImportError('decoding video files needs PyAV: pip install "vargpt[video]" (or pip install av)') from error
    return av


def _describe(source: VideoFile) -> str:
    if isinstance(source, bytes):
        return f"video bytes ({len(source)} bytes)"
    return f"video file {os.fspath(source)!r}"


def _container_of(head: bytes) -> str | None:
    """The VIDEO_FORMATS key of a file by its first bytes, or None."""
    if head[4:8] in _QUICKTIME_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def _read_head(source: VideoFile, what: str) -> bytes:
    if isinstance(source, bytes):
        return source[:_HEADER_BYTES]
    with open(existing_file(source, what), "rb") as file:
        return file.read(_HEADER_BYTES)


def _container_name(source: VideoFile, what: str, formats: Sequence[str] | None) -> str:
    allowed = tuple(VIDEO_FORMATS) if formats is None else tuple(formats)
    unknown = [name for name in allowed if name not in VIDEO_FORMATS]
    if unknown:
        raise ValueError(f"unknown video formats {unknown}; choose from {list(VIDEO_FORMATS)}")
    head = _read_head(source, what)
    if not head:
        raise ImageInputError(f"{what} is empty")
    container = _container_of(head)
    if container is None or container not in allowed:
        raise ImageInputError(f"{what} is not a video in an accepted format ({', '.join(allowed)})")
    return container


class _OpenVideo:
    """The container opened with the demuxer its bytes name, FFmpeg's errors turned into `ImageInputError`."""

    def __init__(self, source: VideoFile, container: str, what: str) -> None:
        self.av, self.what = _av(), what
        file = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        try:
            self.container = self.av.open(file, format=VIDEO_FORMATS[container])
        except (self.av.FFmpegError, OSError, ValueError) as error:
            raise ImageInputError(f"{what} cannot be opened as a video: {error}") from None
        if not self.container.streams.video:
            self.container.close()
            raise ImageInputError(f"{what} has no video stream")
        self.stream = self.container.streams.video[0]

    def __enter__(self) -> _OpenVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()


def _check_frame_size(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{what} has frames of zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{what} has {width}x{height} = {width * height} pixel frames, over the limit of {max_pixels} pixels"
        )


def _count_packets(video: _OpenVideo, max_source_frames: int) -> int:
    """Video packets in the file (read, not decoded), refusing the file as soon as there are too many."""
    count = 0
    try:
        for packet in video.container.demux(video.stream):
            if packet.size:
                count += 1
                if count > max_source_frames:
                    raise ImageInputError(f"{video.what} is too long: over {max_source_frames} frames")
    except (video.av.FFmpegError, OSError, ValueError) as error:
        if isinstance(error, ImageInputError):
            raise
        raise ImageInputError(f"{video.what} is corrupt: {error}") from None
    if count == 0:
        raise ImageInputError(f"{video.what} has no frames")
    return count


def _frame_rate(stream: Any) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def probe_video(
    source: VideoFile,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_source_frames: int = DEFAULT_MAX_SOURCE_FRAMES,
    formats: Sequence[str] | None = None,
) -> VideoInfo:
    """A video file's container, codec, frame size, frame count and rate, checked against the limits without
    decoding a frame. `formats` limits the containers (keys of `VIDEO_FORMATS`); `max_pixels` bounds a frame's
    area and `max_source_frames` the frames in the file."""
    what = _describe(source)
    if not isinstance(source, (str, os.PathLike, bytes)):
        raise ImageInputError(f"expected a video file path or bytes, got {type(source).__name__}")
    container = _container_name(source, what, formats)
    with _OpenVideo(source, container, what) as video:
        context = video.stream.codec_context
        _check_frame_size(context.width, context.height, max_pixels, what)
        declared = video.stream.frames
        if declared > max_source_frames:
            raise ImageInputError(f"{what} is too long: {declared} frames, over the limit of {max_source_frames}")
        frames = _count_packets(video, max_source_frames)
        return VideoInfo(container, context.name, context.width, context.height, frames, _frame_rate(video.stream))


def _decode_selected(video: _OpenVideo, indices: Sequence[int], max_pixels: int) -> list[Image.Image]:
    """The frames at `indices` (sorted) as RGB images, decoding no further than the last one."""
    wanted, frames = set(indices), []
    try:
        for index, frame in enumerate(video.container.decode(video.stream)):
            if index in wanted:
                _check_frame_size(frame.width, frame.height, max_pixels, video.what)
                frames.append(frame.to_image())
            if index >= indices[-1]:
                break
    except (video.av.FFmpegError, OSError, ValueError) as error:
        if isinstance(error, ImageInputError):
            raise
        raise ImageInputError(f"{video.what} is truncated or corrupt: {error}") from None
    if len(frames) < len(indices):
        raise ImageInputError(f"{video.what} is truncated: frame {indices[len(frames)]} does not decode")
    return frames


def load_video(
    source: VideoFile,
    sampling: VideoSampling | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_source_frames: int = DEFAULT_MAX_SOURCE_FRAMES,
    formats: Sequence[str] | None = None,
) -> list[Image.Image]:
    """Decode a video file (a path or its bytes) into the sampled RGB frames, resized as `sampling` says
    (default: Qwen2-VL's `VideoSampling()`), all of one size: a video for `VARGPTProcessor(videos=[frames])`.

    Raises `ImageInputError` (a `ValueError`) for a missing file, a file that is not a video in `formats`, no video
    stream, frames over `max_pixels`, more than `max_source_frames` frames, fewer than 2 frames, or a corrupt or
    truncated file; `ImportError` when PyAV is not installed.
    """
    sampling = sampling or VideoSampling()
    info = probe_video(source, max_pixels, max_source_frames, formats)
    indices = sampling.frame_indices(info.frames, info.fps)
    with _OpenVideo(source, info.container, _describe(source)) as video:
        frames = _decode_selected(video, indices, max_pixels)
    size = sampling.frame_size(frames[0].width, frames[0].height, len(frames))
    return [frame if frame.size == size else frame.resize(size, Image.Resampling.BICUBIC) for frame in frames]


__all__ = [
    "VIDEO_FORMATS",
    "VideoInfo",
    "VideoSampling",
    "load_video",
    "probe_video",
]
