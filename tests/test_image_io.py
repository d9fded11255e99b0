"""Safe image loading: errors for bad inputs, header-first pixel limit, and mode conversions to RGB."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vargpt.image_io import DEFAULT_MAX_PIXELS, ImageInputError, load_image


def _noise_rgb(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_with_header_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR width/height (with a valid CRC), keeping its small pixel data."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def test_default_limit_is_64_megapixels():
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_loads_path_bytes_and_pil(tmp_path: Path, fmt: str):
    original = _noise_rgb()
    data = _encoded(original, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    from_path, from_str, from_bytes = load_image(path), load_image(str(path)), load_image(data)
    for image in (from_path, from_str, from_bytes):
        assert image.mode == "RGB" and image.size == (64, 48)
        assert np.array_equal(np.asarray(image), np.asarray(from_bytes))
    if fmt in ("PNG", "BMP"):  # lossless
        assert np.array_equal(np.asarray(from_path), np.asarray(original))
    assert load_image(original) is original  # already RGB and decoded: no copy


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageInputError, match="not a regular file"):
        load_image(tmp_path)


def test_non_image_file(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture")
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(path)
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(b"")
    with pytest.raises(ImageInputError, match="expected a path, bytes or a PIL image"):
        load_image(np.zeros((4, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_truncated_files_fail_on_full_decode(tmp_path: Path, fmt: str, keep: float):
    data = _encoded(_noise_rgb((128, 96)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    Image.open(path).close()  # the header alone still parses: only decoding reveals the damage
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(path)


def test_corrupt_pixel_data(tmp_path: Path):
    data = bytearray(_encoded(_noise_rgb(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = bytes(40)  # zero out part of the compressed stream
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(bytes(data))


def test_pixel_limit_checked_from_header_before_decoding():
    # The header claims 9000 x 9000 (81 Mpx, above our 64 Mpx default) but the file holds 64 x 48 pixels of data:
    # were the image decoded first, the error would be about truncation, not size.
    bomb = _png_with_header_size(_encoded(_noise_rgb(), "PNG"), 9000, 9000)
    with pytest.raises(ImageInputError, match="9000x9000 = 81000000 pixels, over the limit of 67108864"):
        load_image(bomb)
    with pytest.raises(ImageInputError, match="over the limit of 1000 pixels"):
        load_image(_noise_rgb(), max_pixels=1000)
    assert load_image(_noise_rgb(), max_pixels=64 * 48).size == (64, 48)


def test_pixel_limit_is_independent_of_pil_global(monkeypatch: pytest.MonkeyPatch):
    pil_limit = Image.MAX_IMAGE_PIXELS
    bomb = _png_with_header_size(_encoded(_noise_rgb(), "PNG"), 9000, 9000)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(bomb)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # never changed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own check switched off: ours still holds
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(bomb)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        load_image(_noise_rgb(), max_pixels=0)


def test_zero_size_images():
    with pytest.raises(ImageInputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError):
        load_image(_png_with_header_size(_encoded(_noise_rgb(), "PNG"), 0, 10))


def test_rgba_and_la_composite_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue becomes white
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black becomes mid grey
    out = np.asarray(load_image(Image.fromarray(rgba, mode="RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(load_image(la))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_with_transparency_from_file(tmp_path: Path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    with Image.open(path) as opened:
        assert opened.mode == "P"
    out = np.asarray(load_image(path))
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 0]]  # transparent red -> white, green kept


def test_grey_and_bilevel():
    grey = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L")
    assert np.asarray(load_image(grey))[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert np.asarray(load_image(bilevel))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I;16")
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # PIL's own convert would give [0, 255, 255, 255]
    assert np.array_equal(out[..., 0], out[..., 2])
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(load_image(as_int32))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg(tmp_path: Path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)
    out = np.asarray(load_image(path))
    assert out.shape == (8, 8, 3)
    assert np.abs(out[4, 4].astype(int) - [255, 0, 0]).max() <= 3  # no cyan/yellow ink, no black: red


def test_lazily_opened_pil_image_is_decoded_and_checked(tmp_path: Path):
    path = tmp_path / "lazy.png"
    _noise_rgb().save(path)
    with Image.open(path) as lazy:
        assert load_image(lazy).size == (64, 48)
    with Image.open(path) as lazy, pytest.raises(ImageInputError, match="over the limit"):
        load_image(lazy, max_pixels=100)


def _jpeg_with_orientation(size: tuple[int, int], orientation: int) -> bytes:
    """A JPEG whose pixels are stored `size` wide and high, with an EXIF Orientation tag."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, size[0] // 2, size[1]))  # left half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied_to_files_and_bytes(tmp_path: Path):
    rotated = _jpeg_with_orientation((64, 32), orientation=6)  # stored sideways: shown rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    path.write_bytes(rotated)
    for source in (path, rotated):
        upright = np.asarray(load_image(source))
        assert upright.shape == (64, 32, 3)  # 32 wide, 64 high, as a viewer shows it
        assert upright[4, 16, 2] > 200 and upright[60, 16, 0] > 200  # the stored left (blue) half is now on top
    assert load_image(_jpeg_with_orientation((64, 32), orientation=1)).size == (64, 32)


def _float_tiff(tmp_path: Path, values: np.ndarray) -> Path:
    path = tmp_path / "float.tif"
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    with Image.open(path) as opened:
        assert opened.mode == "F"
    return path


def test_float_tiff_in_unit_range_is_scaled_to_8_bit(tmp_path: Path):
    path = _float_tiff(tmp_path, np.array([[0.0, 0.25, 0.5, 1.0]]))
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]  # PIL's own convert gives [0, 0, 0, 1]: black
    assert np.array_equal(out[..., 0], out[..., 1])


def test_float_tiff_outside_unit_range_is_read_as_8_bit_values_and_clipped(tmp_path: Path):
    path = _float_tiff(tmp_path, np.array([[-5.0, 0.0, 127.6, 255.0, 300.0, np.nan]]))
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]
