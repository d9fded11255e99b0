"""Short generated video clips for the video tests: a red square moving right over a dark background, written with
PyAV (skipped where PyAV is not installed) so that every decoder test knows exactly which frames went in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

SQUARE = 16
BACKGROUND = (20, 40, 60)
RED = (250, 30, 30)
# (container format, codec, pixel format): FFV1 on RGB is lossless; H.264 on 4:2:0 YUV is not
LOSSLESS = ("matroska", "ffv1", "bgr0")
MP4 = ("mp4", "libx264", "yuv420p")


def moving_square(count: int, size: int = 56, step: int = 2) -> np.ndarray:
    """uint8 [count, size, size, 3]: frame t has the square's left edge at column t * step."""
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for t in range(count):
        left = (t * step) % (size - SQUARE)
        frames[t, 20 : 20 + SQUARE, left : left + SQUARE] = RED
    return frames


def encode_clip(frames: np.ndarray, rate: int = 10, kind: tuple[str, str, str] = LOSSLESS) -> bytes:
    """The frames as a video file's bytes at `rate` frames per second."""
    av = pytest.importorskip("av")
    container_format, codec, pixel_format = kind
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_clip(path: Path, frames: np.ndarray, rate: int = 10, kind: tuple[str, str, str] = LOSSLESS) -> Path:
    path.write_bytes(encode_clip(frames, rate, kind))
    return path
