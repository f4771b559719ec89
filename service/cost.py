"""What a request costs, in one unit: one network evaluation of one image.

Admission counts work, not requests: a 16-image, 250-step guided Heun generate asks a worker for
about 16 000 network evaluations, a 1-image, 4-step Euler one for 4, and both used to count as one
request (or as 16 and 1 queued jobs). With costs the per-request limit (MAX_REQUEST_COST, a 422)
and the queue bound (QUEUE_MAX_COST, a 429) hold the work a replica lets in, whatever mix of
requests carries it.

- generate: per image, every network call of the sampler (`model.sampling.model_evaluations`),
  twice when guidance is on (the conditional and unconditional halves). Counting both halves at
  every step is an upper bound when `cfg_interval` leaves some steps unguided.
- encode: one encoder call per image; the request also pays one unit per started megapixel the API
  decodes, which is CPU spent before anything is queued.
- decode: one decoder call per latent.
"""

from __future__ import annotations

from dataclasses import replace

from model.sampling import SamplerConfig, model_evaluations

ENCODE_JOB = 1
DECODE_JOB = 1
PIXELS_PER_UNIT = 1 << 20
"""Decoding and resizing a megapixel costs about one encoder call of the default model on one core."""


def generate_job(cfg: SamplerConfig) -> int:
    """Cost of one generated image under `cfg`.

    The number of network calls does not depend on the shift, so it is counted on the shift-1 grid:
    `time_grid` is cached per settings and an uncached grid costs milliseconds, which a client
    sending a new shift with every request would otherwise make the event loop pay each time.
    """
    evaluations = model_evaluations(replace(cfg, shift=1.0))
    return evaluations * (2 if cfg.guided else 1)


def decoding(pixels: int) -> int:
    """The API's own cost of decoding `pixels` image pixels (started megapixels)."""
    return -(-pixels // PIXELS_PER_UNIT)
