"""Property tests of the image and latent codecs (hypothesis): round trips are exact, bad shapes,
dtypes and non-finite values are refused, and no byte string or JSON value makes a codec raise
anything but its own 4xx error (a 500 in the API)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from service import codecs
from service.errors import BadInput, ServiceError

SIZE = 16
SHAPE = (4, 4, 4)
MAX_ITEMS = 8
PIXELS = 1_000_000
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encoded(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


def assert_client_error(call, *args: object) -> None:
    """The call returns normally, or raises the codec's own error with a 4xx status and a message."""
    try:
        call(*args)
    except ServiceError as exc:
        assert 400 <= exc.status < 500, exc
        assert exc.message
    # Any other exception propagates and fails the test: the API would answer it with a 500.


images = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(codecs.MIN_IMAGE_SIDE, 48), st.integers(codecs.MIN_IMAGE_SIDE, 48), st.just(3)),
)
square_images = hnp.arrays(np.uint8, (SIZE, SIZE, 3))


@FAST
@given(square_images, st.sampled_from([("PNG", {}), ("WEBP", {"lossless": True})]))
def test_lossless_images_at_model_size_round_trip_exactly(pixels: np.ndarray, fmt: tuple) -> None:
    out = codecs.decode_image(encoded(pixels, fmt[0], **fmt[1]), SIZE, PIXELS)
    assert np.array_equal(out, pixels.transpose(2, 0, 1))


@FAST
@given(images, st.sampled_from(["PNG", "JPEG", "WEBP"]), st.sampled_from(["RGB", "L", "RGBA", "P"]))
def test_any_valid_image_becomes_the_model_input(pixels: np.ndarray, fmt: str, mode: str) -> None:
    img = Image.fromarray(pixels).convert(mode)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format=fmt)
    result = codecs.decode_image(out.getvalue(), SIZE, PIXELS)
    assert result.shape == (3, SIZE, SIZE) and result.dtype == np.uint8 and result.flags.c_contiguous
    if mode == "L" and fmt != "WEBP":  # lossy WebP stores grey as YUV: channels differ by rounding
        assert np.array_equal(result[0], result[1]) and np.array_equal(result[1], result[2])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_a_server_error(data: bytes) -> None:
    assert_client_error(codecs.decode_image, data, SIZE, PIXELS)


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid PNG, JPEG or WebP with bytes flipped, cut off, or spliced in (headers included)."""
    pixels = draw(hnp.arrays(np.uint8, (draw(st.integers(8, 24)), draw(st.integers(8, 24)), 3)))
    data = bytearray(encoded(pixels, draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[where] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[where:]
            if not data:
                break
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_images())
def test_damaged_images_are_refused_with_a_client_error(data: bytes) -> None:
    assert_client_error(codecs.decode_image, data, SIZE, PIXELS)


finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
latents = st.integers(1, MAX_ITEMS).flatmap(lambda b: hnp.arrays(np.float32, (b, *SHAPE), elements=finite))


@FAST
@given(latents)
def test_latent_json_and_npy_round_trip_bit_exactly(z: np.ndarray) -> None:
    for back in (
        codecs.latents_from_json(codecs.latents_to_json(z), SHAPE, MAX_ITEMS),
        codecs.latents_from_npy(codecs.latents_to_npy(z), SHAPE, MAX_ITEMS),
    ):
        assert back.dtype == np.dtype("<f4") and back.shape == z.shape
        assert back.tobytes() == z.astype("<f4").tobytes()  # -0.0 and subnormals survive


@FAST
@given(latents, st.data(), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_a_single_non_finite_value_is_refused(z: np.ndarray, data: st.DataObject, bad: float) -> None:
    index = tuple(data.draw(st.integers(0, n - 1)) for n in z.shape)
    z = z.copy()
    z[index] = bad
    for parse, payload in (
        (codecs.latents_from_json, codecs.latents_to_json(z)),
        (codecs.latents_from_npy, codecs.latents_to_npy(z)),
    ):
        with pytest.raises(BadInput, match="NaN or Inf"):
            parse(payload, SHAPE, MAX_ITEMS)


wrong_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=5).map(tuple)


@FAST
@given(wrong_shapes)
def test_wrong_latent_shapes_are_refused(shape: tuple[int, ...]) -> None:
    assume(shape != SHAPE and shape[1:] != SHAPE)
    z = np.zeros(shape, np.float32)
    for parse, payload in (
        (codecs.latents_from_json, codecs.latents_to_json(z)),
        (codecs.latents_from_npy, codecs.latents_to_npy(z)),
    ):
        with pytest.raises(BadInput, match="shape"):
            parse(payload, SHAPE, MAX_ITEMS)


@FAST
@given(st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.complex64, np.bool_]))
def test_wrong_latent_dtypes_are_refused(dtype: type) -> None:
    z = np.zeros(SHAPE, dtype)
    payload = {
        "shape": list(SHAPE),
        "dtype": np.dtype(dtype).name,
        "data": base64.b64encode(z.tobytes()).decode(),
    }
    with pytest.raises(BadInput, match="float32"):
        codecs.latents_from_json(payload, SHAPE, MAX_ITEMS)
    out = io.BytesIO()
    np.save(out, z, allow_pickle=False)
    with pytest.raises(BadInput, match="float32"):
        codecs.latents_from_npy(out.getvalue(), SHAPE, MAX_ITEMS)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
latent_like = st.fixed_dictionaries(
    {
        "shape": st.one_of(json_values, st.lists(st.integers(-3, 10**10), max_size=6)),
        "dtype": st.one_of(st.sampled_from(["float32", "<f4", ">f4", "float64"]), json_values),
        "data": st.one_of(st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()), json_values),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, latent_like))
def test_arbitrary_json_never_escapes_as_a_server_error(payload: object) -> None:
    assert_client_error(codecs.latents_from_json, payload, SHAPE, MAX_ITEMS)


@st.composite
def damaged_npy(draw: st.DrawFn) -> bytes:
    z = draw(latents)
    data = bytearray(codecs.latents_to_npy(z))
    header_end = data.index(b"\n") + 1
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, min(len(data), header_end + 8) - 1))  # mostly in the header
        data[where] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.binary(max_size=512), st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b), damaged_npy())
)
def test_arbitrary_npy_bytes_never_escape_as_a_server_error(data: bytes) -> None:
    assert_client_error(codecs.latents_from_npy, data, SHAPE, MAX_ITEMS)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=100))
def test_body_parsers_raise_only_client_errors(body: bytes, text: str) -> None:
    assert_client_error(codecs.parse_json, body)
    assert_client_error(codecs.decode_base64, text, "field")


@FAST
@given(hnp.arrays(np.float32, (2, 3, 5, 7), elements=st.floats(-4, 4, width=32)))
def test_to_uint8_and_png_are_exact_and_clamped(images: np.ndarray) -> None:
    pixels = codecs.to_uint8(images)
    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8))
    for image in pixels:
        back = np.asarray(Image.open(io.BytesIO(codecs.encode_png(image)))).transpose(2, 0, 1)
        assert np.array_equal(back, image)
