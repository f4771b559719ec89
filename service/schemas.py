"""Request and response models of the HTTP API, with the configured limits in their schema.

The models are built per app from the settings and the model version, so the OpenAPI document
states the real limits (MAX_STEPS, MAX_NUM_IMAGES, the class names) rather than placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from export.repository import ModelConfig
from model.sampling import SAMPLERS, SamplerConfig
from service.codecs import MIN_IMAGE_SIDE
from service.settings import Settings

SEED_MAX = 2**63 - 1
SHIFT_RANGE = (0.01, 100.0)
"""Accepted sampling time shifts. The warp s·t / (1 + (s − 1)·t) is symmetric in s ↔ 1/s; beyond
100× either way every step but one lands at one end of the path (one effective step), and below
about 1e-16 the warp divides by zero."""


class ErrorResponse(BaseModel):
    """Every error answer: `detail` says what was wrong (for 422 validation errors, a list of problems)."""

    detail: str | list[dict[str, object]]


class LatentPayload(BaseModel):
    """Latents as JSON: shape [B, d, h, w] (or [d, h, w] for one), dtype float32, data = base64 of the
    little-endian float32 bytes in C order. Every token (the d values at one position) must have an
    RMS within [0.1, 10]: encode puts them on the sphere of RMS 1."""

    model_config = ConfigDict(extra="allow")
    shape: list[int] = Field(min_length=3, max_length=4)
    dtype: Literal["float32"]
    data: str


class EncodeResponse(LatentPayload):
    """The latents of the uploaded images (the same object /v1/decode accepts) and the model that made them."""

    model: str
    version: str


class ImageOut(BaseModel):
    png: str = Field(description="base64 PNG, RGB, model resolution")
    seed: int | None = Field(None, description="seed that generated the image (generate only)")
    class_label: int | None = Field(None, description="class index (generate only)")
    class_name: str | None = Field(None, description="class name (generate only)")


class ImagesResponse(BaseModel):
    images: list[ImageOut]
    model: str
    version: str
    sampler: dict[str, object] | None = Field(
        None, description="the effective sampler settings (generate only)"
    )


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    runtime: str | None = None
    provider: str | None = None


class ModelEntry(BaseModel):
    name: str
    version: str
    image_size: int
    latent_shape: list[int]
    latent_dtype: str = "float32"
    classes: list[str]
    null_class: int
    sampler_defaults: dict[str, object]
    limits: dict[str, int]
    runtime: str
    provider: str
    ready: bool
    workers: list[WorkerInfo]


class ModelsResponse(BaseModel):
    models: list[ModelEntry]


class Readiness(BaseModel):
    ready: bool
    redis: bool
    workers: int
    model: str
    version: str
    reasons: list[str] = []


@dataclass(frozen=True)
class Schemas:
    """The per-app models whose limits come from settings and the model version."""

    encode_json: type[BaseModel]
    generate: type[BaseModel]


def build_schemas(settings: Settings, config: ModelConfig) -> Schemas:
    """Request models for one app; limits and class names appear in the OpenAPI schema."""
    classes = ", ".join(f"{i}={name!r}" for i, name in enumerate(config.class_names))

    class EncodeJSON(BaseModel):
        """Images as base64 strings (PNG, JPEG or WebP; `data:` URLs accepted)."""

        model_config = ConfigDict(extra="forbid", strict=True)
        images: list[str] = Field(
            min_length=1,
            max_length=settings.max_num_images,
            description=(
                f"1 to {settings.max_num_images} base64 images, each at most {settings.max_image_pixels} "
                f"pixels and at least {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE}"
            ),
        )

    class GenerateRequest(BaseModel):
        """Class-conditional generation; unset sampler fields take the model's defaults. Types are
        strict: integers are JSON integers (not booleans, floats or strings)."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
        class_label: int | str = Field(
            description=(
                "class index, or class name spelled exactly as listed (case-sensitive, as /v1/models "
                f"lists them); classes: {classes}"
            ),
            examples=[0, config.class_names[0]],
        )
        num_images: int = Field(1, ge=1, le=settings.max_num_images, description="images to generate")
        steps: int | None = Field(
            None,
            ge=1,
            le=settings.max_steps,
            description=f"solver steps (default {config.sampler.get('steps')})",
        )
        cfg_scale: float | None = Field(
            None,
            ge=0.0,
            le=50.0,
            description=f"classifier-free guidance scale (default {config.sampler.get('cfg_scale')})",
        )
        cfg_interval: tuple[float, float] | None = Field(
            None,
            description=(
                "SiT-time interval [start, end] within [0, 1] where CFG applies (t = 0 noise, 1 data); "
                f"default {config.sampler.get('cfg_interval')}"
            ),
        )
        sampler: Literal[SAMPLERS] | None = Field(
            None, description=f"solver (default {config.sampler.get('sampler')!r}); sde needs steps >= 3"
        )
        shift: float | None = Field(
            None,
            ge=SHIFT_RANGE[0],
            le=SHIFT_RANGE[1],
            description=f"sampling time shift (default {config.sampler.get('shift')})",
        )
        sampler_preset: str | None = Field(
            None,
            description=(
                f"named sampler settings to start from: {sorted(config.sampler_presets) or 'none for this model'}; "
                "the fields set here override them"
            ),
        )
        seed: int | None = Field(
            None,
            ge=0,
            le=SEED_MAX - settings.max_num_images,
            description="seed of the first image; image i uses seed + i. Random when omitted.",
        )

        @field_validator("cfg_interval")
        @classmethod
        def _interval(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
            if value is not None:
                SamplerConfig(cfg_interval=value)  # its checks, its message
            return value

    return Schemas(encode_json=EncodeJSON, generate=GenerateRequest)
