"""Image faults: every mode Pillow opens gives the picture a user sees (16-bit and float images scaled,
not clipped to white; alpha and palette transparency; CMYK), and EXIF orientation is applied."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip2.processing import Blip2ImageProcessor
from blip2.processing.image import ImageInputError, to_rgb

RAMP = (np.arange(48 * 40).reshape(40, 48) % 256).astype(np.uint8)  # (H, W) 8-bit grey ramp


def saved(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def reference_rgb() -> np.ndarray:
    return np.repeat(RAMP[:, :, None], 3, axis=-1)


@pytest.mark.parametrize("make", [
    lambda: Image.open(io.BytesIO(saved(Image.fromarray(RAMP.astype(np.uint16) * 257)))),  # a 16-bit PNG: I;16
    lambda: Image.fromarray(RAMP.astype(np.int32) * 257),  # mode I holding 16-bit values
    lambda: Image.fromarray(RAMP.astype(np.int32)),  # mode I holding 8-bit values
    lambda: Image.fromarray(RAMP.astype(np.float32) / 255),  # mode F in [0, 1]
    lambda: Image.fromarray(RAMP.astype(np.float32)),  # mode F in [0, 255]
    lambda: Image.fromarray(np.stack([RAMP, np.full_like(RAMP, 128)], -1), "LA"),
    lambda: Image.fromarray(np.stack([RAMP, np.full_like(RAMP, 128)], -1), "LA").convert("La"),
])
def test_deep_grey_and_alpha_modes_keep_their_picture(make):
    image = make()
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 48, 3)
    # premultiplied alpha (La) darkens by the alpha; every other mode gives back the ramp
    expected = reference_rgb() if image.mode != "La" else np.repeat(np.asarray(image)[..., :1], 3, axis=-1)
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= 1


def test_a_16_bit_png_file_is_not_solid_white():
    data = saved(Image.fromarray(RAMP.astype(np.uint16) * 257))
    proc = Blip2ImageProcessor(size=16)
    pixels = proc(data, return_tensors="pt")["pixel_values"]
    grey = proc(Image.fromarray(RAMP), return_tensors="pt")["pixel_values"]
    assert pixels.std() > 0.5  # solid white has no spread
    assert (pixels - grey).abs().max() < 0.05


def test_palette_transparency_and_cmyk():
    palette = Image.fromarray(RAMP).convert("P")
    palette.info["transparency"] = 0
    reopened = Image.open(io.BytesIO(saved(palette)))
    assert reopened.mode == "P" and "transparency" in reopened.info
    assert np.array_equal(np.asarray(to_rgb(reopened)), np.asarray(reopened.convert("RGBA"))[..., :3])
    cmyk = Image.open(io.BytesIO(saved(Image.fromarray(reference_rgb()).convert("CMYK"), "TIFF")))
    assert cmyk.mode == "CMYK"
    assert np.abs(np.asarray(to_rgb(cmyk)).astype(int) - reference_rgb()).max() <= 1


def test_a_float_image_with_nan_is_named():
    bad = RAMP.astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ImageInputError, match="photo.tif.*NaN"):
        to_rgb(Image.fromarray(bad), "photo.tif")


def test_exif_orientation_is_applied():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    data = saved(Image.fromarray(wide), "JPEG", exif=exif.tobytes(), quality=95)
    proc = Blip2ImageProcessor(size={"height": 40, "width": 20}, do_normalize=False, do_rescale=False)
    pixels = proc(data, return_tensors="np")["pixel_values"][0]  # (3, 40, 20)
    # turned upright: 20 wide, 40 tall, the white half now on top
    assert pixels[:, :15].mean() > 200 and pixels[:, 25:].mean() < 50
    rotated = to_rgb(Image.open(io.BytesIO(data)))
    assert rotated.size == (20, 40)


def test_the_server_and_the_training_data_read_images_the_same_way(tmp_path):
    from blip2.train.data import ImageTransform

    pytest.importorskip("fastapi")
    from blip2.server.limits import decode_image

    data = saved(Image.fromarray(RAMP.astype(np.uint16) * 257))
    assert np.abs(np.asarray(decode_image(data, 10**6)).astype(int) - reference_rgb()).max() <= 1
    x = ImageTransform(16)(Image.open(io.BytesIO(data)))
    y = ImageTransform(16)(Image.fromarray(RAMP))
    assert (x - y).abs().max() < 0.05
