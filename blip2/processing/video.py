"""The InstructBLIP video processor: frames in, pixel_values (batch, frames, 3, H, W) out.

Pixel values match transformers 5.x's `InstructBlipVideoVideoProcessor`, which works on torch
tensors rather than Pillow images: each video's uint8 frames are resized together by torch's
antialiased bicubic interpolation (what torchvision calls for uint8 on CPU), then normalised in
float32 as (x - 255 * mean) / (255 * std). Frames are read like images (`Blip2ImageProcessor`:
PIL images, arrays, tensors, paths; grey and RGBA to RGB; EXIF orientation applied).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .batch import BatchFeature
from .config_io import pop_hub_kwargs
from .image import PREPROCESSOR_NAME, PROCESSOR_NAME, Blip2ImageProcessor, ImageInputError

VIDEO_PREPROCESSOR_NAME = "video_preprocessor_config.json"
# Pillow resampling code -> torch interpolation mode. Bicubic is what InstructBLIP video uses; torch
# runs it natively on uint8, as the reference does. (Bilinear's uint8 path in the reference depends
# on the CPU's vector unit, so it is not offered.)
TORCH_MODES = {3: "bicubic"}


class InstructBlipVideoVideoProcessor(Blip2ImageProcessor):
    """Videos -> pixel_values; configured like (and saved as) transformers' video processor.

    Args: as `Blip2ImageProcessor` (default size 384 x 384); `resample` must be bicubic (3).
    """

    config_name = VIDEO_PREPROCESSOR_NAME

    def __init__(self, size: dict | int | None = None, do_sample_frames: bool = False, **kwargs: Any) -> None:
        kwargs.pop("video_processor_type", None)
        kwargs.pop("image_processor_type", None)  # a preprocessor_config.json read as a video processor's
        super().__init__(size=384 if size is None else size, **kwargs)
        if do_sample_frames:
            raise ValueError("do_sample_frames=True is not supported: pass the frames to use (the video "
                             "checkpoints were trained on 4 evenly spaced frames)")
        self._check_resample(self.resample)

    @staticmethod
    def _check_resample(code: int) -> None:
        if code not in TORCH_MODES:
            raise ValueError(f"resample={code}: the video processor resizes with torch, bicubic (3) only")

    def preprocess(self, images: Any, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        """pixel_values for one video or a batch: a video is a list of frames (PIL images, (H, W, C)
        or (C, H, W) arrays, paths), or a (frames, H, W, C) / (frames, C, H, W) array or tensor; a
        batch is a list of videos or a 5-D array. "pt" / "np" stack the batch (equal frame counts);
        None gives a list of (frames, 3, H, W) float32 arrays. Overrides as `Blip2ImageProcessor`'s."""
        options = self._options(overrides)
        self._check_resample(options["resample"])
        videos = [self._video(video, v, options) for v, video in enumerate(_video_list(images))]
        if return_tensors is not None and len({v.shape[0] for v in videos}) > 1:
            raise ValueError(f"the videos have different frame counts {[v.shape[0] for v in videos]}; "
                             "a batch needs the same number of frames in each (or return_tensors=None)")
        return BatchFeature(pixel_values=videos).convert_to_tensors(return_tensors)

    def _video(self, video: Any, v: int, opt: dict) -> np.ndarray:
        """One video's frames -> (F, 3, H, W) float32, by the reference's torch steps."""
        frames = [self._hwc_array(frame, f"video {v} frame {f}", opt["do_convert_rgb"])
                  for f, frame in enumerate(_frame_list(video, v))]
        shapes = {frame.shape for frame in frames}
        if len(shapes) > 1:
            raise ImageInputError(f"video {v}: its frames differ in size {sorted(shapes)}")
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # (F, H, W, C) -> (F, C, H, W)
        if opt["do_normalize"] and x.shape[1] != len(opt["image_mean"]):
            raise ImageInputError(f"video {v}: {x.shape[1]} channels but image_mean has {len(opt['image_mean'])} values")
        if opt["do_resize"]:
            x = _resize(x, opt["size"], opt["resample"])
        if opt["do_normalize"]:
            scale = 1.0 / opt["rescale_factor"] if opt["do_rescale"] else 1.0  # rescaling folded into mean and std
            mean = (torch.tensor(opt["image_mean"]) * scale)[:, None, None]
            std = (torch.tensor(opt["image_std"]) * scale)[:, None, None]
            x = x.to(torch.float32).sub_(mean).div_(std)
        elif opt["do_rescale"]:
            x = x * opt["rescale_factor"]
        return x.numpy()

    # ------------------------------------------------------------ config in and out
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["image_processor_type"]
        data.update(video_processor_type=type(self).__name__, do_sample_frames=False)
        return data

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "InstructBlipVideoVideoProcessor":
        """Reads the `video_processor` entry of processor_config.json (what transformers 5.x saves
        with a processor), else video_preprocessor_config.json, else preprocessor_config.json."""
        from ..hub import ModelNotFoundError, read_json, resolve_file

        hub = pop_hub_kwargs(kwargs)
        nested = resolve_file(name_or_path, PROCESSOR_NAME, required=False, **hub)
        if nested is not None and isinstance(read_json(nested).get("video_processor"), dict):
            return cls.from_dict(read_json(nested)["video_processor"], **kwargs)
        for name in (VIDEO_PREPROCESSOR_NAME, PREPROCESSOR_NAME):
            file = resolve_file(name_or_path, name, required=False, **hub)
            if file is not None:
                return cls.from_dict(read_json(file), **kwargs)
        raise ModelNotFoundError(f"no video processor settings for {os.fspath(name_or_path)!r}: neither a "
                                 f"video_processor entry in {PROCESSOR_NAME} nor {VIDEO_PREPROCESSOR_NAME} "
                                 f"nor {PREPROCESSOR_NAME}")


def _resize(x: torch.Tensor, size: dict[str, int], resample: int) -> torch.Tensor:
    """(F, C, H, W) frames to the size, as the reference: uint8 and float32/64 natively, other
    integers through float32 and rounded back; a video already at the size is left alone."""
    if tuple(x.shape[-2:]) == (size["height"], size["width"]):
        return x
    native = x.dtype in (torch.uint8, torch.float32, torch.float64)
    y = torch.nn.functional.interpolate(x if native else x.to(torch.float32), size=(size["height"], size["width"]),
                                        mode=TORCH_MODES[resample], align_corners=False, antialias=True)
    return y if native else y.round_().to(x.dtype)


def _is_frame(item: Any) -> bool:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)
    return isinstance(item, (Image.Image, str, os.PathLike, bytes, bytearray))


def _video_list(videos: Any) -> list:
    """A list of videos from one video or a batch (the reference's reading of its inputs)."""
    if videos is None:
        raise ImageInputError("no videos given")
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim in (2, 3, 4):
            return [videos]  # one frame, or one video of frames
        raise ImageInputError(f"videos: expected an array of 4 (frames, ...) or 5 (videos, frames, ...) "
                              f"dimensions, got shape {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ImageInputError("the list of videos is empty")
        return [videos] if all(_is_frame(item) for item in videos) else list(videos)
    return [videos]  # a single frame: a one-frame video


def _frame_list(video: Any, v: int) -> list:
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim == 4:
            return list(video)
        if video.ndim in (2, 3):
            return [video]
        raise ImageInputError(f"video {v}: expected (frames, H, W, C) or (frames, C, H, W), got shape "
                              f"{tuple(video.shape)}")
    if isinstance(video, (list, tuple)):
        if not video:
            raise ImageInputError(f"video {v} has no frames")
        return list(video)
    if _is_frame(video):
        return [video]
    raise ImageInputError(f"video {v}: unsupported type {type(video).__name__}; pass a list of frames "
                          "or a (frames, H, W, C) array")
