"""The image processor against transformers 4.37's BlipImageProcessor, on real photographs.

The photographs ship inside scikit-image (skimage/data); the other modes (LA, P, CMYK, 16-bit,
1-bit, 32-bit int and float) are made from them with Pillow and read back from real files.
"""

from __future__ import annotations

import json
import struct
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from blip2.processing.image import (
    BatchFeature,
    Blip2ImageProcessor,
    ImageInputError,
    ImageTooLargeError,
    to_rgb,
)

skimage_data = pytest.importorskip("skimage.data")
DATA = Path(skimage_data.__file__).parent
BLIP2 = dict(size={"height": 224, "width": 224}, resample=3, do_convert_rgb=True,
             image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
SHIPPED = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "camera.png",
           "coins.png", "microaneurysms.png", "horse.png", "logo.png", "no_time_for_that_tiny.gif", "color.png"]


def reference(**overrides):
    from transformers import BlipImageProcessor

    return BlipImageProcessor(**{**BLIP2, **overrides})


def ours(**overrides) -> Blip2ImageProcessor:
    return Blip2ImageProcessor(**{**BLIP2, **overrides})


def _saved(image: Image.Image, fmt: str, tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.{fmt.lower()}"
    image.save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> dict[str, Path]:
    """The shipped photographs, plus files in other modes made from them."""
    tmp = tmp_path_factory.mktemp("photos")
    files = {name: DATA / name for name in SHIPPED}
    camera = Image.open(DATA / "camera.png")
    coins = Image.open(DATA / "coins.png").resize(camera.size)
    la = camera.convert("LA")
    la.putalpha(coins)
    files["LA"] = _saved(la, "PNG", tmp, "camera_la")
    files["P"] = _saved(Image.open(DATA / "coffee.png").quantize(64), "PNG", tmp, "coffee_p")
    files["CMYK"] = _saved(Image.open(DATA / "chelsea.png").convert("CMYK"), "JPEG", tmp, "chelsea_cmyk")
    sixteen = Image.fromarray((np.asarray(camera, dtype=np.uint16) * 257))
    files["I;16"] = _saved(sixteen, "PNG", tmp, "camera_16bit")
    files["1"] = _saved(camera.convert("1"), "PNG", tmp, "camera_1bit")
    files["I"] = _saved(Image.fromarray(np.asarray(camera, dtype=np.int32) * 3), "TIFF", tmp, "camera_i32")
    files["F"] = _saved(Image.fromarray(np.asarray(camera, dtype=np.float32) / 2), "TIFF", tmp, "camera_f32")
    files["RGBA"] = _saved(Image.open(DATA / "astronaut.png").convert("RGBA"), "PNG", tmp, "astronaut_rgba")
    return files


def _compare(ours_out, ref_out) -> float:
    a, b = ours_out["pixel_values"], ref_out["pixel_values"]
    assert tuple(a.shape) == tuple(b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_real_photographs_equal_reference(photo_files):
    """Every file, in its own mode and size, gives the reference's pixel_values to 1e-6."""
    modes, sizes, worst = set(), set(), 0.0
    for name, path in photo_files.items():
        image = Image.open(path)
        modes.add(image.mode)
        sizes.add(image.size)
        got = ours()(path, return_tensors="pt")  # ours reads the file itself
        # Deliberate difference: the reference clips 16-bit, 32-bit and float images to 8 bits (a 16-bit
        # PNG comes out white); ours scales them (tests/test_faults_images.py). The rest of the pipeline
        # must still match, so the reference gets ours' 8-bit picture of those modes.
        deep = image.mode in ("I", "F") or image.mode.startswith("I;16")
        want = reference()(to_rgb(Image.open(path)) if deep else Image.open(path), return_tensors="pt")
        diff = _compare(got, want)
        assert diff <= 1e-6, f"{name} ({image.mode} {image.size}): max abs diff {diff:.2e}"
        worst = max(worst, diff)
        assert got["pixel_values"].shape == (1, 3, 224, 224)
    assert len(photo_files) >= 10 and len(sizes) >= 8
    assert {"RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "I", "F"} <= modes, modes
    print(f"\n{len(photo_files)} photographs, modes {sorted(modes)}: max |ours - reference| = {worst:.2e}")


@pytest.mark.parametrize("settings", [
    dict(size={"height": 364, "width": 364}),
    dict(size={"height": 200, "width": 300}, resample=2),
    dict(do_normalize=False),
    dict(do_resize=False),
    dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], rescale_factor=1 / 127.5),
])
def test_other_settings_equal_reference(settings):
    image = Image.open(DATA / "chelsea.png")
    got = ours(**settings)([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], return_tensors="pt")
    want = reference(**settings)([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], return_tensors="pt")
    assert _compare(got, want) <= 1e-6


def test_arrays_and_tensors_equal_reference():
    """HWC and CHW, uint8 and float (both [0, 255] and [0, 1]), NumPy and torch, single and batched."""
    photo = np.asarray(Image.open(DATA / "coffee.png"))
    inputs = {
        "hwc uint8": photo, "chw uint8": photo.transpose(2, 0, 1),
        "hwc float [0,255]": photo.astype(np.float32), "hwc float64 [0,1]": photo / 255.0,
        "chw float32 [0,1]": (photo / 255.0).astype(np.float32).transpose(2, 0, 1),
        "torch chw uint8": torch.from_numpy(photo.transpose(2, 0, 1).copy()),
        "torch hwc float": torch.from_numpy(photo.astype(np.float32)),
        "batch of 2 (4-D)": np.stack([photo, photo[::-1]]),
        "list of 2": [photo, np.ascontiguousarray(photo[:, ::-1])],
    }
    for name, value in inputs.items():
        with pytest.warns(UserWarning, match="already looks rescaled") if "[0,1]" in name else nullcontext():
            got = ours()(value, return_tensors="pt")
        want = reference()(value, return_tensors="pt")
        assert _compare(got, want) <= 1e-6, name


def test_inputs_the_reference_refuses_become_rgb():
    """A 2-D grey array, a one-channel array and an RGBA array are converted, as Pillow would."""
    grey = np.asarray(Image.open(DATA / "camera.png"))
    from_pil = ours()(Image.fromarray(grey), return_tensors="pt")["pixel_values"]
    assert torch.equal(ours()(grey, return_tensors="pt")["pixel_values"], from_pil)
    assert torch.equal(ours()(grey[None], return_tensors="pt")["pixel_values"], from_pil)
    rgba = np.asarray(Image.open(DATA / "logo.png"))
    want = ours()(Image.fromarray(rgba).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.equal(ours()(rgba, return_tensors="pt")["pixel_values"], want)


def test_return_types_and_batch_feature():
    image = Image.open(DATA / "astronaut.png")
    listed = ours()([image, image])["pixel_values"]
    assert isinstance(listed, list) and listed[0].shape == (3, 224, 224) and listed[0].dtype == np.float32
    assert ours()(image, return_tensors="np")["pixel_values"].shape == (1, 3, 224, 224)
    batch = BatchFeature(pixel_values=torch.zeros(1, 3, 4, 4), input_ids=torch.ones(1, 3, dtype=torch.long))
    moved = batch.to(torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.input_ids.dtype == torch.long
    moved = batch.to("cpu", torch.bfloat16)
    assert moved["pixel_values"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long
    with pytest.raises(AttributeError):
        batch.no_such_key


# ---------------------------------------------------------------- config files

def test_preprocessor_config_round_trips_with_reference(tmp_path):
    from transformers import BlipImageProcessor

    ref = reference(size={"height": 364, "width": 364})
    ref.save_pretrained(str(tmp_path / "ref"))
    loaded = Blip2ImageProcessor.from_pretrained(tmp_path / "ref")
    assert loaded.size == {"height": 364, "width": 364} and loaded.resample == 3
    loaded.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text())
    assert written == json.loads((tmp_path / "ref" / "preprocessor_config.json").read_text())
    back = BlipImageProcessor.from_pretrained(str(tmp_path / "ours"))
    image = Image.open(DATA / "rocket.jpg")
    assert _compare(loaded(image, return_tensors="pt"), back(image, return_tensors="pt")) <= 1e-6


def test_unknown_config_keys_are_kept(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**BLIP2, "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor", "future": 1}))
    loaded = Blip2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict()["future"] == 1 and loaded.to_dict()["processor_class"] == "Blip2Processor"


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="size must be"):
        Blip2ImageProcessor(size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="resample"):
        Blip2ImageProcessor(resample=9)
    with pytest.raises(ValueError, match="image_std"):
        Blip2ImageProcessor(image_std=[0.2, 0.0, 0.2])
    with pytest.raises(TypeError, match="unknown image processor option"):
        Blip2ImageProcessor()(np.zeros((4, 4, 3), np.uint8), do_resise=False)


# ---------------------------------------------------------------- bad input names the image

def test_truncated_jpeg_and_png_name_the_image(tmp_path):
    for name in ("rocket.jpg", "astronaut.png"):
        data = (DATA / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageInputError, match=rf"image 1 \(.*cut_{name}\): truncated or corrupt"):
            ours()([DATA / "coffee.png", cut])
        with pytest.raises(ImageInputError, match="image 0: truncated or corrupt"):
            ours()(data[: len(data) // 2])
        with pytest.raises(ImageInputError, match="image 0.*truncated or corrupt"):
            ours()(Image.open(cut))  # opened lazily by the caller


def test_bytes_that_are_no_image():
    with pytest.raises(ImageInputError, match=r"image 0: not a readable image \(no image format recognised\)$"):
        ours()(b"this is plain text, not an image")  # not PIL's message, which names an object's address
    with pytest.raises(ImageInputError, match="image 2: the bytes are empty"):
        ours()([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), b""])
    with pytest.raises(ImageInputError, match="no such file"):
        ours()("/nonexistent/picture.png")
    with pytest.raises(ImageInputError, match="unsupported type dict"):
        ours()({"not": "an image"})


def test_zero_pixel_images():
    with pytest.raises(ImageInputError, match=r"image 0 has no pixels \(size 0x10\)"):
        ours()(Image.new("RGB", (0, 10)))
    with pytest.raises(ImageInputError, match="image 1 has no pixels"):
        ours()([np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="empty"):
        ours()([])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) and whose pixel data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # Above our default limit, below Pillow's own error threshold: our check from the header.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageTooLargeError, match="image 0 is 10000x10000"):
        ours()(_png_header_only(10_000, 10_000))
    # Far above: Pillow refuses to open it; still our error type and the image named.
    with pytest.raises(ImageTooLargeError, match="image 1"):
        ours()([np.zeros((8, 8, 3), np.uint8), _png_header_only(100_000, 100_000)])
    # The limit is configurable.
    with pytest.raises(ImageTooLargeError, match="limit of 1000"):
        ours(max_pixels=1000)(_png_header_only(40, 40))


def test_pixel_limit_applies_to_arrays_and_loaded_images():
    small = ours(max_pixels=100)
    with pytest.raises(ImageTooLargeError, match="image 0 is 20x20 = 400 pixels"):
        small(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ImageTooLargeError):
        small(Image.new("RGB", (20, 20)))
    assert small(np.zeros((10, 10, 3), np.uint8), return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


def test_unsupported_modes_and_arrays():
    assert ours()(Image.new("La", (8, 8)), return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)
    with pytest.raises(ImageInputError, match="cannot tell the channel axis of shape"):
        ours()(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ImageInputError, match="unsupported array dtype bool"):
        ours()(np.zeros((8, 8, 3), bool))
    with pytest.raises(ImageInputError, match="unsupported array dtype complex"):
        ours()(np.zeros((8, 8, 3), np.complex64))
    with pytest.raises(ImageInputError, match=r"image 0: expected an array of 2 or 3 dimensions"):
        ours()([np.zeros((2, 2, 8, 8, 3), np.uint8)])
    with pytest.raises(ImageInputError, match=r"must lie in \[0, 255\]"):
        ours()(np.full((8, 8, 3), 300.0))
    with pytest.raises(ImageInputError, match="NaN"):
        ours()(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(ImageInputError, match="URLs are not fetched"):
        ours()("https://example.com/cat.png")


def test_error_types_are_value_errors():
    assert issubclass(ImageInputError, ValueError) and issubclass(ImageTooLargeError, ImageInputError)


def test_the_shared_batch_work_and_the_pillow_path_change_no_bit():
    """pixels_or_errors rescales and normalises a batch in one go and resizes PIL images without the
    round trip through NumPy: each image's pixels are exactly what it gets alone, as an array; a bad
    image fails alone, in its place."""
    photo = Image.open(DATA / "coffee.png")
    images = [photo, photo.convert("L"), photo.convert("RGBA"), photo.convert("P"),
              photo.resize((37, 3)), photo.resize((5, 1)), photo.resize((40, 4)), photo.resize((9, 2))]
    processor = ours()
    together = processor.pixels_or_errors(images[:4] + [b"not an image"] + images[4:])
    assert isinstance(together.pop(4), ImageInputError)
    for n, (image, got) in enumerate(zip(images, together)):
        as_array = processor([np.asarray(to_rgb(image))])["pixel_values"][0]  # never the Pillow path
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, as_array, err_msg=f"image {n} ({image.mode} {image.size})")
        np.testing.assert_array_equal(got, processor([image])["pixel_values"][0])  # alone: no shared batch
    want = reference()(images[:4], return_tensors="np")["pixel_values"]
    assert np.abs(np.stack(together[:4]) - want).max() <= 1e-6
