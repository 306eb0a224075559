"""Server settings, the request limits they set, and the checks that turn bad input into clear 4xx errors.

Every check raises `ApiError`, which the app renders as
`{"error": {"message", "type", "param", "code"}}` (OpenAI's error shape, so their clients
show the message) with the status it carries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..processing.image import to_rgb
from .stops import MAX_STOP_CHARS, MAX_STOPS


@dataclass
class Settings:
    """What the server accepts and how it batches. Defaults suit one CPU or GPU serving one model."""

    model_name: str = "blip2"
    # request limits
    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 25_000_000  # 5000 x 5000: larger images are mostly a way to exhaust memory
    max_prompt_chars: int = 2000
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128  # the most a request may ask for
    default_max_new_tokens: int = 30
    max_num_beams: int = 8
    max_texts: int = 32  # per /v1/match or /v1/embeddings request
    max_text_chars: int = 1000
    # batching: "continuous" (requests join and leave the running decode batch at every step; see
    # scheduler.py) or "micro" (requests arriving together run to the end together; batcher.py)
    batching: str = "continuous"
    max_batch: int = 8  # the most requests in one forward (continuous: rows of the KV cache)
    kv_cache_mb: float | None = None  # continuous: a bound on the KV cache (fewer rows when it is small)
    max_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 60.0
    # the image-feature cache (entries, one per distinct image)
    cache_size: int = 256
    # access: when set, /v1/*, /metrics and the API docs need `Authorization: Bearer <key>` (or `X-API-Key`)
    api_key: str | None = None
    # sockets: a connection must send its request headers within header_timeout_s (idle ones are
    # closed then too), and its body within body_timeout_s; at most limit_concurrency connections
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    limit_concurrency: int | None = None

    def validate(self) -> None:
        """Raises ValueError naming the first setting out of range (NaN and infinities included)."""
        for name in ("max_body_bytes", "max_image_pixels", "max_prompt_chars", "max_prompt_tokens",
                     "max_new_tokens", "max_num_beams", "max_texts", "max_text_chars", "max_batch", "max_queue"):
            _check_setting(name, getattr(self, name), 1, integer=True)
        _check_setting("cache_size", self.cache_size, 0, integer=True)
        if self.limit_concurrency is not None:
            _check_setting("limit_concurrency", self.limit_concurrency, 1, integer=True)
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be between 1 and max_new_tokens")
        _check_setting("max_wait_ms", self.max_wait_ms, 0)
        if self.batching not in ("continuous", "micro"):
            raise ValueError(f"batching must be 'continuous' or 'micro', got {self.batching!r}")
        if self.kv_cache_mb is not None:
            _check_setting("kv_cache_mb", self.kv_cache_mb, 1e-6)
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            _check_setting(name, getattr(self, name), 1e-3)


def _check_setting(name: str, value: Any, minimum: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum:
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} >= {minimum:g}, got {value!r}")


class ApiError(Exception):
    """An error the client caused (or a state it must wait out), with the HTTP status to answer."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


_ERROR_TYPES = {
    401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 408: "timeout",
    413: "request_too_large", 415: "unsupported_media_type", 429: "rate_limit_error",
    500: "server_error", 501: "not_implemented", 503: "overloaded", 504: "timeout",
}


# ---------------------------------------------------------------- parameters
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def int_param(fields: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer in [lo, hi]; form fields arrive as strings, so "12" counts as 12."""
    value = fields.get(name)
    if _missing(value):
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def float_param(fields: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    """A finite number in [lo, hi]."""
    value = fields.get(name)
    if _missing(value):
        return default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ApiError(400, f"'{name}' must be a number, got {value!r}", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return float(value)


def bool_param(fields: dict, name: str, default: bool = False) -> bool:
    value = fields.get(name)
    if _missing(value):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name)


def text_param(fields: dict, name: str, max_chars: int, required: bool = False, default: str = "") -> str:
    value = fields.get(name)
    if _missing(value):
        if required:
            raise ApiError(400, f"'{name}' is required and must be a non-empty string", name)
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {type(value).__name__}", name)
    return check_text(value, name, max_chars)


def check_text(value: str, name: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise ApiError(400, f"'{name}' is {len(value)} characters long; the limit is {max_chars}", name)
    if "\x00" in value:
        raise ApiError(400, f"'{name}' must not contain NUL characters", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise ApiError(400, f"'{name}' is not valid Unicode text: {value[err.start]!r} at position {err.start} "
                       "is a lone surrogate", name) from None
    return value


def texts_param(fields: dict, name: str, settings: Settings) -> list[str]:
    """One string or a non-empty list of strings (a form may repeat the field)."""
    value = fields.get(name)
    if isinstance(value, str) and value.strip():
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'{name}' is required: a string or a non-empty list of strings", name)
    if len(value) > settings.max_texts:
        raise ApiError(400, f"'{name}' holds {len(value)} texts; the limit is {settings.max_texts}", name)
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ApiError(400, f"every item of '{name}' must be a non-empty string", name)
        check_text(item, name, settings.max_text_chars)
    return value


def stops_param(fields: dict, name: str = "stop") -> tuple[str, ...]:
    """Stop strings: one string or a list of up to MAX_STOPS; whitespace counts ("\\n" is a common one)."""
    value = fields.get(name)
    if value is None or value == "" or value == []:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise ApiError(400, f"'{name}' must be a non-empty string or a list of non-empty strings", name)
    if len(items) > MAX_STOPS:
        raise ApiError(400, f"'{name}' holds {len(items)} strings; the limit is {MAX_STOPS}", name)
    return tuple(dict.fromkeys(check_text(item, name, MAX_STOP_CHARS) for item in items))


# ---------------------------------------------------------------- images
@dataclass
class ImageData:
    """An uploaded image: its bytes' sha256 (the cache key), and either the decoded RGB picture or,
    when the cache already held them, its features (then the image is never decoded)."""

    sha256: str
    image: Image.Image | None = None
    features: Any = None


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_base64(value: Any, name: str = "image") -> bytes:
    """Raw base64 or a `data:image/...;base64,` URL -> bytes."""
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a base64 string or a data URL, got {type(value).__name__}", name)
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"'{name}' data URL must be base64-encoded (data:image/png;base64,...)", name)
    elif text.startswith(("http://", "https://", "file:")):
        raise ApiError(400, f"'{name}': the server does not fetch URLs; send the image inline as a base64 data URL", name)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{name}' is not valid base64", name) from None
    if not data:
        raise ApiError(400, f"'{name}' is empty", name)
    return data


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Bytes -> an RGB PIL image, refusing what is not an image or is too large before decoding it."""
    if not data:
        raise ApiError(400, f"'{name}' is empty", name)
    try:
        with warnings.catch_warnings():
            # PIL warns on large images; our own limit (checked from the header) is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            width, height = picture.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ApiError(413, f"'{name}' is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", name)
            if width < 1 or height < 1:
                raise ApiError(400, f"'{name}' has no pixels ({width}x{height})", name)
            picture.load()
            return to_rgb(picture, f"'{name}'")
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"'{name}' decompresses to more pixels than allowed", name) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
        raise ApiError(400, f"'{name}' could not be decoded as an image ({type(err).__name__}: {err})", name) from None
