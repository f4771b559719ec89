"""Bytes ↔ arrays at the API boundary: images in, latents in and out, PNGs out.

Everything a client sends is untrusted, so each decoder checks the cheap facts (magic bytes,
header sizes, shapes, dtypes) before doing the expensive or dangerous work (decompressing pixels,
allocating arrays), and every failure is a typed 4xx error whose message names the problem.

Image preprocessing, as documented in the OpenAPI schema: EXIF orientation applied; alpha
composited over black (the default model's backgrounds are black); 16-bit channels scaled to 8
bits; converted to RGB; the short side resized to the model resolution (Pillow bicubic with
antialiasing) and the long side centre-cropped.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pydantic_core
from numpy.lib import format as npy_format
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadInput, PayloadTooLarge, UnsupportedMedia

INLINE_PIXELS = 128 * 128
"""Images up to this many pixels are decoded or PNG-encoded on the event loop (well under a
millisecond); a worker-thread hop costs more than that on a busy machine. Larger ones go to threads."""

MIN_IMAGE_SIDE = 8
"""Smallest accepted image side in pixels: below this an upscale to the model resolution is noise."""

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
NPY_MEDIA_TYPE = "application/x-npy"
LATENT_DTYPE = "float32"

JSON_MAX_DEPTH = 200
"""Deepest nesting a JSON body may have (the limit of the parser, pydantic-core's jiter; every
request body of this API is at most 3 levels deep)."""
JSON_MAX_DIGITS = 4300
"""Longest integer a JSON body may hold (Python's own limit on int ↔ str conversion)."""

LATENT_RMS_RANGE = (0.1, 10.0)
"""Accepted RMS of each latent token over its channels. Encoders put every token on the sphere of
RMS 1 and the decoder was trained there; nearer the origin or farther out its answers are meaningless
(at 1e38 float32 overflows into a black image)."""

_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def _clean(message: object) -> str:
    """An exception's text without Python object reprs (`<_io.BytesIO object at 0x…>`)."""
    return _REPR.sub("the data", str(message))


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be, checked from its header before any pixel is decompressed:
    total pixels, each side, and the long side over the short one (which sets the resize cost)."""

    max_pixels: int
    max_side: int = 1 << 30
    max_aspect: float = float("inf")


_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def decode_image(data: bytes, size: int, limits: ImageLimits | int) -> np.ndarray:
    """Decode a PNG/JPEG/WebP and return the model's input: uint8 3×size×size (RGB, CHW).

    The size is checked from the header before any pixel is decompressed (the decompression-bomb
    guard); truncated or corrupt data, tiny images and other formats are refused. An int `limits`
    is a pixel limit alone.
    """
    return finish_image(open_image(data, limits), size)


def open_image(data: bytes, limits: ImageLimits | int) -> Image.Image:
    """Read and check only the header: format, pixel count, sides, aspect ratio. Cheap at any size,
    so callers can look at `width × height` before deciding where to spend the decoding work."""
    if isinstance(limits, int):
        limits = ImageLimits(limits)
    if not data:
        raise BadInput("image is empty (0 bytes)", status=400)
    if not _looks_like_image(data):
        raise UnsupportedMedia(
            f"data is not a PNG, JPEG or WebP image (first bytes {data[:8].hex()}); send one of those formats"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError:
        # Pillow's own guard fired first (its limit is far above any MAX_IMAGE_PIXELS accepted).
        raise PayloadTooLarge(
            f"image has more pixels than the limit of {limits.max_pixels} (MAX_IMAGE_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        raise BadInput(
            "image header is corrupt or truncated: it starts like a PNG, JPEG or WebP file but cannot be read"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"image header is corrupt or truncated: {_clean(exc)}") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {width}×{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
            "(MAX_IMAGE_PIXELS)"
        )
    if max(width, height) > limits.max_side:
        raise PayloadTooLarge(
            f"image is {width}×{height}; no side may exceed {limits.max_side} pixels (MAX_IMAGE_SIDE)"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadInput(f"image is {width}×{height}; both sides must be at least {MIN_IMAGE_SIDE} pixels")
    if max(width, height) > limits.max_aspect * min(width, height):
        raise BadInput(
            f"image is {width}×{height}; the long side may be at most {limits.max_aspect:g} times the short "
            "one (MAX_IMAGE_ASPECT)"
        )
    return img


def finish_image(img: Image.Image, size: int) -> np.ndarray:
    """Decompress an image `open_image` accepted, then orient, convert and resize it."""
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when it needs no turn
        rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"image data is corrupt or truncated ({img.format}): {_clean(exc)}") from None
    return _resize_centre_crop(rgb, size)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit data scaled (Pillow would clip it) and alpha composited over black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_centre_crop(img: Image.Image, size: int) -> np.ndarray:
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) != (size, size):
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_base64(text: object, what: str) -> bytes:
    """Strict base64 (standard alphabet, padding required); a data: URL prefix is accepted."""
    if not isinstance(text, str):
        raise BadInput(f"{what} must be a base64 string, got {json_type(text)}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{what} is not valid base64: {_clean(exc)}", status=400) from None


def check_latents(array: np.ndarray, latent_shape: tuple[int, ...], max_items: int) -> np.ndarray:
    """Validate latents and return them as a contiguous little-endian float32 B×d×h×w batch.

    A single d×h×w latent is taken as a batch of one.
    """
    if array.dtype != np.float32:
        raise BadInput(f"latent dtype must be float32, got {array.dtype}")
    if array.ndim == len(latent_shape):
        array = array[None]
    if array.ndim != len(latent_shape) + 1 or tuple(array.shape[1:]) != tuple(latent_shape):
        expected = "×".join(map(str, latent_shape))
        raise BadInput(
            f"latent shape must be {list(latent_shape)} or [B, {', '.join(map(str, latent_shape))}] "
            f"(B×{expected}), got {list(array.shape)}"
        )
    if not 1 <= array.shape[0] <= max_items:
        raise BadInput(f"a request holds 1 to {max_items} latents (MAX_NUM_IMAGES), got {array.shape[0]}")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise BadInput(f"latent contains {bad} NaN or Inf value(s); every value must be finite")
    return np.ascontiguousarray(array, dtype="<f4")


def check_on_sphere(latents: np.ndarray) -> None:
    """422 unless every token of a B×d×h×w batch has an RMS over its d channels in LATENT_RMS_RANGE.

    A decoding rule, not a format rule: the .npy and JSON formats hold any finite float32.
    """
    # Mean squares against squared bounds, in float32: a square past float32's range is inf, which
    # is off the sphere as it should be, and the bounds are far apart next to float32's precision.
    mean_square = np.einsum("bd...,bd...->b...", latents, latents) / latents.shape[1]
    low, high = LATENT_RMS_RANGE
    off = int(np.count_nonzero((mean_square < low * low) | (mean_square > high * high)))
    if off:
        rms = np.sqrt(np.mean(np.square(latents, dtype=np.float64), axis=1))  # exact, for the message
        raise BadInput(
            f"{off} latent token(s) lie far off the sphere: each token's RMS over its {latents.shape[1]} "
            f"channels must be within [{low:g}, {high:g}] (encode gives 1), found {rms.min():.3g} to "
            f"{rms.max():.3g}"
        )


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages (never a Python repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _check_shape_list(shape: object, max_elements: int, max_dims: int) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        got = json_type(shape) if not isinstance(shape, list) else "a list holding other values"
        raise BadInput(f"latent 'shape' must be a non-empty list of integers, got {got}")
    if len(shape) > max_dims:
        raise BadInput(f"latent 'shape' has {len(shape)} dimensions; at most {max_dims} are allowed")
    if any(d < 1 for d in shape):
        raise BadInput(f"latent 'shape' sizes must be positive, got {_short(shape)}")
    # Each size is bounded before the product, which stays an exact (small) Python int.
    if any(d > max_elements for d in shape) or math.prod(shape) > max_elements:
        raise BadInput(
            f"latent 'shape' {_short(shape)} has more elements than the {max_elements} a request may hold "
            "(MAX_NUM_IMAGES latents)"
        )
    return tuple(shape)


def latents_from_json(payload: object, latent_shape: tuple[int, ...], max_items: int) -> np.ndarray:
    """Parse `{"shape": [...], "dtype": "float32", "data": base64 little-endian float32}`."""
    if not isinstance(payload, dict):
        raise BadInput(
            f"latent JSON must be an object with shape, dtype and data, got {type(payload).__name__}"
        )
    missing = [key for key in ("shape", "dtype", "data") if key not in payload]
    if missing:
        raise BadInput(f"latent JSON lacks the field(s) {missing}; expected shape, dtype and data")
    dtype = payload["dtype"]
    if dtype not in (LATENT_DTYPE, "<f4"):
        got = f"'{_short(dtype)}'" if isinstance(dtype, str) else json_type(dtype)
        raise BadInput(f"latent dtype must be 'float32' (little-endian), got {got}")
    max_elements = max_items * math.prod(latent_shape)
    shape = _check_shape_list(payload["shape"], max_elements, len(latent_shape) + 1)
    raw = decode_base64(payload["data"], "latent 'data'")
    expected = math.prod(shape) * 4
    if len(raw) != expected:
        raise BadInput(
            f"latent 'data' holds {len(raw)} bytes but shape {list(shape)} of float32 needs {expected}"
        )
    return check_latents(np.frombuffer(raw, dtype="<f4").reshape(shape), latent_shape, max_items)


def latents_from_npy(data: bytes, latent_shape: tuple[int, ...], max_items: int) -> np.ndarray:
    """Parse a .npy file without pickle; the header is checked before any data is allocated.

    numpy parses the untrusted header with Python's tokenizer and `ast.literal_eval`, which fail
    with several exception types (ValueError, SyntaxError, tokenize.TokenError, ... found by
    fuzzing), so any failure while reading the header means "not a valid .npy", a 400.
    """
    stream = io.BytesIO(data)
    try:
        major, _minor = npy_format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {major}")
    except Exception as exc:
        raise BadInput(
            f"body is not a valid .npy file: {type(exc).__name__}: {_clean(exc)}", status=400
        ) from None
    if dtype.hasobject:
        raise BadInput("npy arrays of Python objects are refused (they would need pickle)")
    if dtype != np.dtype("<f4") and dtype != np.dtype(">f4"):
        raise BadInput(f"latent dtype must be float32, got {dtype.str} ({dtype})")
    max_elements = max_items * math.prod(latent_shape)
    shape = _check_shape_list(list(shape), max_elements, len(latent_shape) + 1)
    expected = math.prod(shape) * 4
    raw = stream.read()
    if len(raw) != expected:
        raise BadInput(
            f".npy data holds {len(raw)} bytes but shape {list(shape)} of float32 needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return check_latents(array.astype("<f4"), latent_shape, max_items)


def latents_to_json(latents: np.ndarray) -> dict[str, object]:
    """The JSON latent format: shape, dtype and base64 of the little-endian float32 bytes."""
    array = np.ascontiguousarray(latents, dtype="<f4")
    return {
        "shape": list(array.shape),
        "dtype": LATENT_DTYPE,
        "data": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def latents_to_npy(latents: np.ndarray) -> bytes:
    """A version-1 .npy file of the little-endian float32 latents."""
    stream = io.BytesIO()
    npy_format.write_array(stream, np.ascontiguousarray(latents, dtype="<f4"), allow_pickle=False)
    return stream.getvalue()


PNG_LEVEL = 1
"""zlib level of the PNGs answered. With the Sub filter, level 1 writes a 256×256 image in 3.3 ms
and 134 KB where Pillow's PNG writer at its default level 6 took 10.7 ms for 118 KB (synthetic
photo-like content, the 2-core VM); a 32×32 image in 37 µs against Pillow's 84 µs."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 3×H×W image: 8-bit RGB, every row Sub-filtered (each byte minus the
    same channel one pixel to its left, PNG filter type 1), no metadata, so equal pixels give equal
    bytes. Written here rather than by Pillow, whose per-image overhead and adaptive filtering cost
    2–3× more time for the answers this service sends."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"encode_png takes a uint8 3×H×W array, got {image.dtype} {image.shape}")
    _, height, width = image.shape
    rows = np.ascontiguousarray(image.transpose(1, 2, 0)).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 1
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # wraps modulo 256, as PNG defines
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_LEVEL))
        + _png_chunk(b"IEND", b"")
    )


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images → uint8 with clamping and round-half-to-even (the only quantisation step)."""
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def parse_json(body: bytes) -> object:
    """JSON body → Python object, with a 400 that quotes the parser's position on malformed input.

    pydantic-core's parser is bounded (JSON_MAX_DEPTH, JSON_MAX_DIGITS) where the standard
    library's recurses until RecursionError and converts any integer until ValueError.
    """
    try:
        return pydantic_core.from_json(body)
    except ValueError as exc:
        raise BadInput(json_error(str(exc)), status=400) from None


def json_error(message: str) -> str:
    """The 400 message for a JSON parser error, naming the limit when a limit was hit."""
    if "recursion limit" in message:
        return f"body is not valid JSON: nested deeper than {JSON_MAX_DEPTH} levels ({message})"
    if "number out of range" in message:
        return f"body is not valid JSON: a number longer than {JSON_MAX_DIGITS} digits ({message})"
    return f"body is not valid JSON: {message}"


def _short(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
