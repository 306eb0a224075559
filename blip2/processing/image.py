"""The BLIP image processor: RGB, a square bicubic resize, rescale, normalise.

Pixel values match transformers' `BlipImageProcessor` (4.37) to the last bit: the same Pillow
resize and the same NumPy dtype steps. Where the reference fails on an input (a single-channel
or RGBA array, a grey 2-D array) this one converts it to RGB instead. Every error names the image
by its index in the batch, and by its file name when it came from a file.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..io import atomic_write_text
from .batch import BatchFeature, as_tensor  # noqa: F401  (as_tensor: importable from here as before)
from .config_io import pop_hub_kwargs

PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's own decompression-bomb threshold (it only warns below twice this); ours refuses above it.
DEFAULT_MAX_PIXELS = 89_478_485
RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class ImageInputError(ValueError):
    """An image that cannot be read or used; the message names which one and why."""


class ImageTooLargeError(ImageInputError):
    """An image with more pixels than the processor's `max_pixels` (decompression-bomb guard)."""


# ---------------------------------------------------------------- reading one image

def _describe(index: int, source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image {index} ({os.fspath(source)})"
    name = getattr(source, "filename", None) or getattr(source, "name", None)
    return f"image {index} ({name})" if isinstance(name, str) and name else f"image {index}"


def _check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{what} has no pixels (size {width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{what} is {width}x{height} = {width * height} pixels, more than the limit "
                                 f"of {max_pixels} (a possible decompression bomb); raise max_pixels to allow it")


def open_image(source: Any, what: str, max_pixels: int | None) -> Image.Image:
    """Opens a path, bytes or binary file; checks the size from the header before decoding any pixels."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageInputError(f"{what}: URLs are not fetched; download the file and pass its path or bytes")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageInputError(f"{what}: the bytes are empty")
        source = io.BytesIO(bytes(source))
    try:
        image = Image.open(source)
    except FileNotFoundError:
        raise ImageInputError(f"{what}: no such file") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{what}: {err}") from None
    except Image.UnidentifiedImageError:  # PIL's message names its in-memory file object, not the image
        raise ImageInputError(f"{what}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{what}: not a readable image ({err})") from None
    return image


def _load_pixels(image: Image.Image, what: str, max_pixels: int | None) -> Image.Image:
    """Size check, then the full decode; truncated or corrupt data becomes an ImageInputError."""
    _check_pixels(image.width, image.height, max_pixels, what)
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{what}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise ImageInputError(f"{what}: truncated or corrupt image data ({err})") from None
    return image


def _pil_to_rgb(image: Image.Image, what: str) -> np.ndarray:
    return np.asarray(to_rgb(image, what))


EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (how cameras store portrait photos).

    The reference's processor ignores the tag, so a phone photo reaches its model on its side;
    this one turns it as every image viewer does (a deliberate difference, see the README).
    """
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return image
    return ImageOps.exif_transpose(image) if orientation not in (1, None) else image


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Any mode Pillow opens -> an 8-bit RGB image, upright (EXIF orientation applied).

    16- and 32-bit integer images (I;16 PNGs, I) and float images (F) are scaled to 8 bits rather
    than clipped (Pillow's own convert turns them all but white); alpha is dropped, as the
    reference does for RGBA.
    """
    image = upright(image)
    try:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            return Image.fromarray(_deep_to_uint8(image, what)).convert("RGB")
        if image.mode == "RGB":
            return image
        if image.mode == "La":  # premultiplied grey + alpha, which Pillow cannot convert: its grey channel
            return Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., 0])).convert("RGB")
        if image.mode in ("RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")  # premultiplied / palette alpha: through RGBA, whose alpha is dropped
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageInputError(f"{what}: cannot convert mode {image.mode!r} to RGB ({err})") from None


def _deep_to_uint8(image: Image.Image, what: str) -> np.ndarray:
    """A one-channel image of more than 8 bits as uint8 (H, W): 16-bit ranges scaled by 255/65535,
    floats in [0, 1] by 255 (other floats taken as 0-255), 32-bit integers holding 8-bit values kept."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise ImageInputError(f"{what}: a float image with NaN or infinite pixels")
        if array.size and array.min() >= 0 and array.max() <= 1:
            array = array * 255
    elif image.mode.startswith("I;16") or (array.size and array.max() > 255):
        array = np.clip(array, 0, 65535) * (255 / 65535)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _infer_channels_last(array: np.ndarray, what: str) -> np.ndarray:
    """HWC from HWC or CHW, deciding as the reference does (a 1 or 3 first axis means CHW)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ImageInputError(f"{what}: expected an array of 2 or 3 dimensions (H, W[, C]) or (C, H, W), "
                              f"got shape {tuple(array.shape)}")
    for channels in ((1, 3), (4,)):
        if array.shape[0] in channels:
            return np.moveaxis(array, 0, -1)
        if array.shape[-1] in channels:
            return array
    raise ImageInputError(f"{what}: cannot tell the channel axis of shape {tuple(array.shape)}; "
                          "expected 1, 3 or 4 channels first or last")


def _array_from(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
        value = value.numpy()
    if value.dtype == bool or not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise ImageInputError(f"{what}: unsupported array dtype {value.dtype}; use uint8 or float")
    return value


# ---------------------------------------------------------------- the processor

class Blip2ImageProcessor:
    """BLIP-2's image preprocessing, configured like (and saved as) transformers' `BlipImageProcessor`.

    Args:
        size: output (height, width) as {"height": h, "width": w} or an int for a square (224 for BLIP-2,
            364 for the -coco checkpoints).
        resample: a Pillow resampling code (3 = bicubic) or its name.
        max_pixels: images above this many pixels are refused before decoding (None: no limit).
    """

    model_input_names = ["pixel_values"]
    config_name = PREPROCESSOR_NAME  # the file save_pretrained writes

    def __init__(self, do_resize: bool = True, size: dict | int | None = None, resample: int | str = 3,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Iterable[float] | None = None, image_std: float | Iterable[float] | None = None,
                 do_convert_rgb: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS, **kwargs: Any) -> None:
        self.do_resize = bool(do_resize)
        self.size = _size_dict(224 if size is None else size)
        self.resample = _resample_code(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = rescale_factor
        self.do_normalize = bool(do_normalize)
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else _floats(image_mean, "image_mean"))
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else _floats(image_std, "image_std"))
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.do_convert_rgb = bool(do_convert_rgb)
        self.max_pixels = max_pixels
        kwargs.pop("image_processor_type", None)
        self.extra = kwargs  # unknown keys (processor_class, feature_extractor_type, ...) round-trip unchanged

    # ------------------------------------------------------------ preprocessing
    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        """pixel_values (N, 3, H, W) for one image or a list: PIL images, arrays, tensors, paths or bytes.

        Keyword overrides (do_resize, size, resample, do_rescale, rescale_factor, do_normalize,
        image_mean, image_std, do_convert_rgb) apply to this call only.
        """
        pixels = self.pixels_or_errors(images, **overrides)
        for result in pixels:
            if isinstance(result, Exception):
                raise result
        batch = BatchFeature(pixel_values=pixels)
        return batch.convert_to_tensors(return_tensors)

    def pixels_or_errors(self, images: Any, **overrides: Any) -> list:
        """Each image's float32 (3, H, W) pixel_values, or the ImageInputError (or OSError) that stopped it,
        so one bad image fails alone; the batch's rescale and normalise run as one NumPy operation."""
        options = self._options(overrides)
        sized = []
        for index, item in enumerate(_as_list(images)):
            try:
                sized.append(self._sized(item, index, options))
            except (ImageInputError, OSError) as err:
                sized.append(err)
        return _finish(sized, options)

    def _options(self, overrides: dict) -> dict:
        unknown = set(overrides) - {"do_resize", "size", "resample", "do_rescale", "rescale_factor",
                                    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "data_format",
                                    "input_data_format"}
        if unknown:
            raise TypeError(f"unknown image processor option(s): {sorted(unknown)}")
        if overrides.get("data_format", "channels_first") not in ("channels_first", None):
            raise ValueError("only data_format='channels_first' is supported")
        options = {key: getattr(self, key) for key in ("do_resize", "size", "resample", "do_rescale",
                                                       "rescale_factor", "do_normalize", "image_mean",
                                                       "image_std", "do_convert_rgb")}
        for key, value in overrides.items():
            if value is not None and key in options:
                options[key] = value
        options["size"] = _size_dict(options["size"])
        options["resample"] = _resample_code(options["resample"])
        return options

    def _sized(self, item: Any, index: int, opt: dict) -> np.ndarray:
        """One image checked and resized, (H, W, C), before rescaling, by the reference's dtype steps."""
        what = _describe(index, item)
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read"):
            item = open_image(item, what, self.max_pixels)
        if isinstance(item, Image.Image) and (fast := self._sized_pil(item, what, opt)) is not None:
            return fast
        array = self._hwc_array(item, what, opt["do_convert_rgb"])
        if array.shape[-1] != len(opt["image_mean"]) and opt["do_normalize"]:
            raise ImageInputError(f"{what}: {array.shape[-1]} channels but image_mean has "
                                  f"{len(opt['image_mean'])} values; keep do_convert_rgb=True for RGB")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ImageInputError(f"{what}: contains NaN or infinite values")
        if opt["do_resize"]:
            array = _resize(array, opt["size"], opt["resample"], what)
        if opt["do_rescale"] and array.dtype.kind == "f" and array.size and array.min() >= 0 and array.max() <= 1:
            # stacklevel 4: past _sized, pixels_or_errors and preprocess, to preprocess's caller
            warnings.warn(f"{what} already looks rescaled to [0, 1]; pass do_rescale=False for such inputs",
                          stacklevel=4)
        return array

    def _sized_pil(self, image: Image.Image, what: str, opt: dict) -> np.ndarray | None:
        """The usual case without its round trip through NumPy: an RGB image resized by Pillow directly,
        which is what `_resize` does with its array. None where that path would differ: no resize, no
        RGB conversion, a mean of other than 3 values, or a height of 1 or 3, which the reference takes
        for a channels-first array."""
        if not (opt["do_resize"] and opt["do_convert_rgb"]) or (opt["do_normalize"] and len(opt["image_mean"]) != 3):
            return None
        rgb = to_rgb(_load_pixels(image, what, self.max_pixels), what)
        if rgb.height in (1, 3):
            return None
        size = opt["size"]
        return np.asarray(rgb.resize((size["width"], size["height"]), resample=opt["resample"]))

    def _hwc_array(self, item: Any, what: str, convert_rgb: bool) -> np.ndarray:
        """The image as an (H, W, C) array: opened, size-checked, decoded, and RGB when asked."""
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read"):
            item = open_image(item, what, self.max_pixels)
        if isinstance(item, Image.Image):
            item = upright(_load_pixels(item, what, self.max_pixels))
            array = _pil_to_rgb(item, what) if convert_rgb else np.asarray(item)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            array = _array_from(item, what)
        else:
            raise ImageInputError(f"{what}: unsupported type {type(item).__name__}; pass a PIL image, a NumPy "
                                  "array, a torch tensor, a file path or the file's bytes")
        array = _infer_channels_last(array, what)
        _check_pixels(array.shape[1], array.shape[0], self.max_pixels, what)
        return _rgb_channels(array) if convert_rgb else array

    # ------------------------------------------------------------ config in and out
    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            do_convert_rgb=self.do_convert_rgb, do_normalize=self.do_normalize, do_rescale=self.do_rescale,
            do_resize=self.do_resize, image_mean=list(self.image_mean), image_processor_type="BlipImageProcessor",
            image_std=list(self.image_std), resample=self.resample, rescale_factor=self.rescale_factor,
            size=dict(self.size),
        )
        if self.max_pixels != DEFAULT_MAX_PIXELS:
            data["max_pixels"] = self.max_pixels
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "Blip2ImageProcessor":
        if not isinstance(data, dict):
            raise TypeError(f"image processor config must be a dict, got {type(data).__name__}")
        return cls(**{**data, **overrides})

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes `config_name` (preprocessor_config.json) in transformers' format; returns its path."""
        path = Path(directory) / self.config_name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "Blip2ImageProcessor":
        """Reads preprocessor_config.json (or the `image_processor` entry of a newer processor_config.json)
        from a directory, a Hugging Face cache snapshot or the hub; other kwargs override config keys."""
        from ..hub import ModelNotFoundError, read_json, resolve_file

        hub = pop_hub_kwargs(kwargs)
        file = resolve_file(name_or_path, PREPROCESSOR_NAME, required=False, **hub)
        if file is not None:
            return cls.from_dict(read_json(file), **kwargs)
        nested = resolve_file(name_or_path, PROCESSOR_NAME, required=False, **hub)
        if nested is not None and isinstance(read_json(nested).get("image_processor"), dict):
            return cls.from_dict(read_json(nested)["image_processor"], **kwargs)
        try:
            resolve_file(name_or_path, PREPROCESSOR_NAME, **hub)  # raises, saying where it looked
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"{err} (nor is there an image_processor entry in {PROCESSOR_NAME})") from None
        raise ModelNotFoundError(f"{PREPROCESSOR_NAME} for {os.fspath(name_or_path)!r} vanished while loading")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


BlipImageProcessor = Blip2ImageProcessor


# ---------------------------------------------------------------- helpers

def _as_list(images: Any) -> list:
    """A list of single images: a 4-D array or tensor is a batch, a list or tuple is a batch."""
    if images is None:
        raise ImageInputError("no images given")
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("the list of images is empty")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _size_dict(size: Any) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f"size must be {{'height': h, 'width': w}}, an int or (h, w), got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise ValueError(f"size values must be positive ints, got {size!r}")
    return {"height": size["height"], "width": size["width"]}


def _resample_code(resample: Any) -> int:
    if isinstance(resample, str) and resample.lower() in RESAMPLE_NAMES:
        return RESAMPLE_NAMES[resample.lower()]
    code = int(resample) if isinstance(resample, (int, Image.Resampling)) and not isinstance(resample, bool) else -1
    if code not in RESAMPLE_NAMES.values():
        raise ValueError(f"resample must be a Pillow resampling code 0-5 or one of {sorted(RESAMPLE_NAMES)}, "
                         f"got {resample!r}")
    return code


def _floats(value: Any, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    values = [float(v) for v in value]
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def _rgb_channels(array: np.ndarray) -> np.ndarray:
    """Grey to three channels and RGBA to RGB, as Pillow's convert('RGB') would."""
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return array[..., :3]
    return array


def _to_uint8(array: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
    """The uint8 image Pillow resizes, and whether values were scaled from [0, 1] (the reference's rule)."""
    if array.dtype == np.uint8:
        return array, False
    if np.allclose(array, array.astype(np.int64)):
        if array.min() < 0 or array.max() > 255:
            raise ImageInputError(f"{what}: integer pixel values must lie in [0, 255], "
                                  f"got [{array.min()}, {array.max()}]")
        return array.astype(np.uint8), False
    if array.min() >= 0 and array.max() <= 1:
        # Truncation, not rounding: what the reference's conversion to a PIL image does.
        return (array * 255).astype(np.float32).astype(np.uint8), True
    raise ImageInputError(f"{what}: float pixel values must be whole numbers in [0, 255] or lie in [0, 1], "
                          f"got [{array.min()}, {array.max()}]")


def _finish(sized: list, opt: dict) -> list:
    """Rescaled, normalised float32 (3, H, W) arrays from `_sized`'s (H, W, C) ones; errors pass through.
    uint8 images of one size (the usual batch) are done together: the same element-wise steps, so
    the same bits, in one NumPy call instead of one per image."""
    arrays = [a for a in sized if not isinstance(a, Exception)]
    if len(arrays) > 1 and all(a.dtype == np.uint8 and a.shape == arrays[0].shape for a in arrays):
        done = iter(_channels_first(np.stack(arrays), opt))
        return [a if isinstance(a, Exception) else next(done) for a in sized]
    return [a if isinstance(a, Exception) else _channels_first(a[None], opt)[0] for a in sized]


def _channels_first(batch: np.ndarray, opt: dict) -> np.ndarray:
    """(B, H, W, C) -> rescaled and normalised (B, C, H, W) float32."""
    if opt["do_rescale"]:
        batch = (batch * opt["rescale_factor"]).astype(np.float32)
    if opt["do_normalize"]:
        batch = _normalize(batch, opt["image_mean"], opt["image_std"])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def _normalize(array: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    if array.dtype.kind != "f":
        array = array.astype(np.float32)
    return (array - np.array(mean, dtype=array.dtype)) / np.array(std, dtype=array.dtype)


def _resize(array: np.ndarray, size: dict[str, int], resample: int, what: str) -> np.ndarray:
    """Pillow's resize of the uint8 image, back in the input's value range (HWC)."""
    pixels, scaled = _to_uint8(array, what)
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    resized = np.asarray(image.resize((size["width"], size["height"]), resample=resample))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if scaled:
        resized = (resized * (1 / 255)).astype(np.float32)
    return resized
