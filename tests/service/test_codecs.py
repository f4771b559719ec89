import io

import numpy as np
import pytest
from numpy.lib import format as npy_format
from PIL import Image

from service import codecs
from service.errors import BadInput, PayloadTooLarge, ServiceError, UnsupportedMedia
from tests.service.payloads import huge_png_header, image_bytes, latent_json, npy_bytes

SIZE = 16
LIMIT = 1_000_000
SHAPE = (4, 4, 4)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_formats_decode_to_chw_uint8(fmt: str) -> None:
    out = codecs.decode_image(image_bytes(40, 24, fmt), SIZE, LIMIT)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8


def test_resize_short_side_then_centre_crop() -> None:
    # Three 20-px bands red | green | blue; short side 20 → 16 scales width 60 → 48; the centre
    # 16 columns are exactly the green band.
    bands = np.zeros((20, 60, 3), np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255
    out = codecs.decode_image(encoded(Image.fromarray(bands)), SIZE, LIMIT)
    interior = out[:, :, 2:-2].astype(int)
    assert interior[1].min() >= 250 and interior[0].max() <= 5 and interior[2].max() <= 5


def test_grey_alpha_and_16_bit_inputs() -> None:
    grey = codecs.decode_image(image_bytes(16, 16, mode="L"), SIZE, LIMIT)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    transparent = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    assert codecs.decode_image(encoded(transparent), SIZE, LIMIT).max() == 0  # over black
    deep = Image.fromarray(np.full((16, 16), 0xFF00, np.uint16))
    assert codecs.decode_image(encoded(deep), SIZE, LIMIT).min() == 0xFF  # scaled, not clipped


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"definitely not an image", UnsupportedMedia, "not a PNG, JPEG or WebP"),
        (b"", BadInput, "empty"),
        (image_bytes(64, 64)[:200], BadInput, "truncated"),
        (image_bytes(64, 64, "JPEG")[:300], BadInput, "truncated"),
        (image_bytes(1, 1), BadInput, "1×1"),
        (image_bytes(100, 4), BadInput, "at least 8"),
        (huge_png_header(), PayloadTooLarge, "pixels"),
        (huge_png_header(2000, 1000), PayloadTooLarge, "2000×1000"),
        (encoded(Image.new("RGB", (16, 16)), "GIF"), UnsupportedMedia, "PNG, JPEG or WebP"),
    ],
)
def test_bad_images_are_4xx_naming_the_problem(data: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        codecs.decode_image(data, SIZE, LIMIT)
    assert 400 <= info.value.status < 500


def test_latent_json_and_npy_round_trip() -> None:
    z = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    back = codecs.latents_from_json(codecs.latents_to_json(z), SHAPE, 8)
    assert back.dtype == np.dtype("<f4") and np.array_equal(back, z)
    assert np.array_equal(codecs.latents_from_npy(codecs.latents_to_npy(z), SHAPE, 8), z)
    one = codecs.latents_from_json(latent_json(z[0]), SHAPE, 8)
    assert one.shape == (1, *SHAPE)
    fortran = codecs.latents_from_npy(npy_bytes(np.asfortranarray(z)), SHAPE, 8)
    big_endian = codecs.latents_from_npy(npy_bytes(z.astype(">f4")), SHAPE, 8)
    assert np.array_equal(fortran, z) and np.array_equal(big_endian, z)


def _nan_latent() -> np.ndarray:
    z = np.zeros((1, *SHAPE), np.float32)
    z[0, 1, 2, 3] = np.nan
    z[0, 0, 0, 0] = np.inf
    return z


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (latent_json(np.zeros((1, 4, 4, 5), np.float32)), "shape must be"),
        (latent_json(np.zeros((1, 4, 4, 4), np.float64), dtype="float64"), "float32"),
        (latent_json(_nan_latent()), "2 NaN or Inf"),
        (latent_json(np.zeros((9, *SHAPE), np.float32)), "MAX_NUM_IMAGES"),
        ({"shape": [1, 4, 4, 4], "dtype": "float32", "data": "@@@"}, "base64"),
        ({"shape": [1, 4, 4, 4], "dtype": "float32", "data": "AAAA"}, "needs 256"),
        ({"shape": [4, 4, 4], "dtype": "float32"}, "lacks"),
        ({"shape": "4x4x4", "dtype": "float32", "data": ""}, "list of integers"),
        ({"shape": [10**9, 10**9], "dtype": "float32", "data": ""}, "elements"),
        ([1, 2, 3], "object"),
    ],
)
def test_bad_latent_json(payload: object, message: str) -> None:
    with pytest.raises(ServiceError, match=message) as info:
        codecs.latents_from_json(payload, SHAPE, 8)
    assert 400 <= info.value.status < 500


def test_bad_npy() -> None:
    with pytest.raises(BadInput, match=r"not a valid \.npy"):
        codecs.latents_from_npy(b"\x93NUMPY garbage", SHAPE, 8)
    with pytest.raises(BadInput, match="float32"):
        codecs.latents_from_npy(npy_bytes(np.zeros(SHAPE, np.float64)), SHAPE, 8)
    pickled = io.BytesIO()
    npy_format.write_array_header_1_0(pickled, {"descr": "|O", "fortran_order": False, "shape": (2,)})
    with pytest.raises(BadInput, match="pickle"):
        codecs.latents_from_npy(pickled.getvalue() + b"\x80\x04junk", SHAPE, 8)
    # A header promising a huge array is refused before anything is allocated.
    header = npy_bytes(np.zeros((1, 1), np.float32))
    forged = header.replace(b"(1, 1)", b"(99999999, 99999999)".ljust(6))
    with pytest.raises(BadInput):
        codecs.latents_from_npy(forged, SHAPE, 8)
    with pytest.raises(BadInput, match="NaN"):
        codecs.latents_from_npy(npy_bytes(_nan_latent()), SHAPE, 8)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (5, 1), (48, 64)])
def test_png_decodes_to_the_same_pixels_in_any_shape(height: int, width: int) -> None:
    img = np.random.default_rng(height * width).integers(0, 256, (3, height, width), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(codecs.encode_png(img)))
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    assert np.array_equal(np.asarray(decoded).transpose(2, 0, 1), img)


def test_png_encoding_is_deterministic_and_lossless() -> None:
    img = np.random.default_rng(1).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    png = codecs.encode_png(img)
    assert png == codecs.encode_png(img.copy())
    back = np.asarray(Image.open(io.BytesIO(png))).transpose(2, 0, 1)
    assert np.array_equal(back, img)
    assert np.array_equal(codecs.to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])), [0, 0, 128, 255, 255])
