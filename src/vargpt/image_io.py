"""Safe loading of untrusted images into RGB PIL images.

Images reach the model from users and crawled datasets, so loading must fail loudly and cheaply: the pixel count
is checked from the file header before any pixel is decoded (a small file can declare a huge canvas), the image is
fully decoded so truncated or corrupt files fail here rather than deep inside preprocessing, and every mode is
turned into 8-bit RGB in a defined way (transparency composited on white, 16-bit and float data scaled rather than
clipped). Files are turned upright by their EXIF orientation, as every viewer shows them (phone photos are stored
sideways with an Orientation tag).
The limit is our own argument: PIL's process-wide `Image.MAX_IMAGE_PIXELS` is never changed.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels (8192 x 8192): far above what the models use (Qwen2-VL caps understanding images at about one
# megapixel, generation targets are at most 1024 x 1024) and below PIL's own default warning threshold
# (89,478,485 pixels), yet a fully decoded RGB image of this size still takes only 192 MiB.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageSource = str | os.PathLike | bytes | Image.Image

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageInputError(ValueError):
    """An image that cannot be used: missing, unreadable, corrupt, truncated, empty or too large."""


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels"
        )


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return "PIL image"
    return f"image file {os.fspath(source)!r}"


def existing_file(source: str | os.PathLike, what: str) -> str:
    """`source` as a path string, once it names an existing regular file (else `ImageInputError` naming `what`)."""
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ImageInputError(f"{what} does not exist")
    if not os.path.isfile(path):
        raise ImageInputError(f"{what} is not a regular file")
    return path


def _open(source: str | os.PathLike | bytes, max_pixels: int, formats: Sequence[str] | None = None) -> Image.Image:
    """Open lazily (header only), enforce the pixel limit, then decode every pixel."""
    what = _describe(source)
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), max_pixels, what, formats)
    with open(existing_file(source, what), "rb") as file:
        return _decode(file, max_pixels, what, formats)


def _decode(stream: BinaryIO, max_pixels: int, what: str, formats: Sequence[str] | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We enforce our own limit just below; PIL's warning about its global threshold is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=None if formats is None else list(formats))
    except UnidentifiedImageError as error:
        if formats is not None:
            raise ImageInputError(f"{what} is not an image in an accepted format ({', '.join(formats)})") from error
        raise ImageInputError(f"{what} is not an image PIL can read") from error
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{what} exceeds PIL's global Image.MAX_IMAGE_PIXELS limit: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{what} has a corrupt header: {error}") from error
    _check_size(image.size, max_pixels, what)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageInputError(f"{what} is truncated or corrupt: {error}") from error
    return image


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Map 16-bit grey (modes I;16*, and I read as 16-bit data) linearly onto 0..255, rounding to nearest."""
    values = np.asarray(image).astype(np.float64)
    grey_8bit = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(grey_8bit).convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """Map 32-bit float grey (mode F, e.g. float TIFFs) onto 0..255, rounding to nearest.

    Float images usually hold intensities in [0, 1]; PIL's own conversion clips them to 0 or 1 of 255, i.e. black.
    So an image whose finite values all lie in [0, 1] is scaled by 255. Any other image is read as already on the
    0..255 scale (floats written from 8-bit data) and clipped to it; we do not stretch min..max, which would change
    how bright the picture is. NaN and -inf become 0, +inf 255.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        values = values * 255.0
    grey_8bit = np.rint(np.clip(np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)).astype(np.uint8)
    return Image.fromarray(grey_8bit).convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to 8-bit RGB.

    RGBA/LA/PA and palette images with a transparent colour are composited on white (the usual look of a
    transparent background; dropping alpha would expose arbitrary hidden colours). I;16 and I are treated as
    16-bit grey and scaled by 255/65535 (PIL's own conversion would clip everything above 255 to white); F (float)
    as in `_float_to_rgb`.
    L, 1, CMYK, YCbCr, RGBX and the rest use PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageInputError(f"cannot convert an image of mode {mode!r} to RGB: {error}") from error


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (in place, and drop the tag) so the pixels face the way viewers show them."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def load_image(
    source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] | None = None
) -> Image.Image:
    """Load an image from a path, encoded bytes or a PIL image as a fully decoded RGB PIL image.

    `formats` (PIL format names such as "PNG") limits which decoders may run on untrusted files and bytes: without
    it every format PIL knows is tried, EPS included, which hands the bytes to Ghostscript.

    Raises `ImageInputError` (a `ValueError`) for a missing file, a non-image, a corrupt or truncated file, a
    zero-size image, or one with more than `max_pixels` pixels (checked from the header, before decoding).
    Files and bytes are turned upright by their EXIF orientation; a PIL image is taken as the caller holds it (it
    may have been rotated already).
    Truncation detection relies on PIL: if some library has set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`
    process-wide, PIL fills missing data silently instead of failing.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "PIL image")
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageInputError(f"PIL image is truncated or corrupt: {error}") from error
        return to_rgb(source)
    if not isinstance(source, (str, os.PathLike, bytes)):
        raise ImageInputError(f"expected a path, bytes or a PIL image, got {type(source).__name__}")
    return to_rgb(_upright(_open(source, max_pixels, formats)))


# A video given as frames: a sequence of images (paths, bytes or PIL) or one uint8 array [T, H, W, 3].
VideoSource = Sequence[ImageSource] | np.ndarray


def load_video_frames(video: VideoSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """Decode a video's frames to RGB PIL images of one size, in order.

    Qwen2-VL pairs consecutive frames into one temporal patch, so frames of different sizes cannot form a video:
    that is an error here rather than a silent resize. A torch tensor works where it converts to numpy.
    """
    if hasattr(video, "numpy") and not isinstance(video, np.ndarray):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ImageInputError(f"a video array must be [frames, height, width, 3], got shape {video.shape}")
        if video.dtype != np.uint8:
            raise ImageInputError(f"a video array must hold uint8 pixels, got {video.dtype}")
        frames = [Image.fromarray(np.ascontiguousarray(frame)) for frame in video]
    elif isinstance(video, (list, tuple)):
        frames = [load_image(frame, max_pixels=max_pixels) for frame in video]
    else:
        raise ImageInputError(
            f"a video must be a list of frames or a [frames, height, width, 3] array, got {type(video).__name__}"
        )
    if not frames:
        raise ImageInputError("a video needs at least one frame")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ImageInputError(f"all frames of a video must have one size, got {sorted(sizes)}")
    _check_size(frames[0].size, max_pixels, "video frame")
    return frames
