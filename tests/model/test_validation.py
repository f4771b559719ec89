"""The one field validator every config dataclass uses: ints are never bools, ranges are exact."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from model import validation as check
from model.lightningdit import dit_config
from model.pae import PAEConfig
from model.vfm.base import VFMSpec


@dataclass
class Fields:
    a: object = 1
    b: object = 0.5


def test_ints_reject_bools_floats_and_out_of_range_values() -> None:
    check.positive_ints(Fields(a=3), "a")
    check.non_negative_ints(Fields(a=0), "a")
    for bad in (True, False, 0, -1, 2.0, "2", None):
        with pytest.raises(ValueError, match=r"Fields\.a must be a positive int"):
            check.positive_ints(Fields(a=bad), "a")
    for bad in (True, -1, 1.0):
        with pytest.raises(ValueError, match=r"Fields\.a must be an int ≥ 0"):
            check.non_negative_ints(Fields(a=bad), "a")


def test_numbers_fractions_and_betas() -> None:
    check.positive_numbers(Fields(b=1e-8), "b")
    check.non_negative_numbers(Fields(b=0), "b")
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="finite number > 0"):
            check.positive_numbers(Fields(b=bad), "b")
    check.fraction(Fields(b=0.0), "b")
    check.fraction(Fields(b=1.0), "b", closed=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        check.fraction(Fields(b=1.0), "b")
    check.betas(Fields(b=(0.9, 0.95)), "b")
    for bad in ((0.9,), (0.9, 1.0), (True, 0.9), "ab"):
        with pytest.raises(ValueError, match="two numbers in"):
            check.betas(Fields(b=bad), "b")
    with pytest.raises(ValueError, match=r"one of \('x', 'y'\)"):
        check.one_of(Fields(a="z"), "a", ("x", "y"))


def test_architecture_configs_refuse_a_bool_where_an_int_belongs() -> None:
    vfm = VFMSpec("efficientnet-lite0", 128, 112, 4, 8, stride=16)
    with pytest.raises(ValueError, match=r"VFMSpec\.heads must be a positive int"):
        VFMSpec("efficientnet-lite0", 128, 112, True, 8, stride=16)
    with pytest.raises(ValueError, match=r"PAEConfig\.latent_dim must be a positive int"):
        PAEConfig(
            vfm=vfm, image_size=32, latent_dim=True, decoder_width=128, decoder_heads=4, decoder_patch=4
        )
    with pytest.raises(ValueError, match=r"DiTConfig\.depth must be a positive int"):
        dit_config("tiny", 16, 8, 10, depth=True)
