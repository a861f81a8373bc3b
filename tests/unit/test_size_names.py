"""Size names the resource model understands (Gemma-4's among them) and parameter counts."""

from __future__ import annotations

import pytest

from mergebake import resources as R


@pytest.mark.parametrize(
    "name,params",
    [("e2b", 5.1e9), ("e4b", 8.0e9), ("26b-a4b", 25.2e9), ("31b", 30.7e9), ("E4B", 8.0e9)],
)
def test_gemma4_size_names_are_their_model_card_parameter_counts(name, params):
    assert R.parse_size_name(name) == R.SIZE_BYTES[name.lower()] == pytest.approx(2 * params)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("7b", 14_000_000_000),
        ("1.5b", 3_000_000_000),
        ("350m", 700_000_000),
        ("40b-a6b", 80_000_000_000),  # a mixture of experts stores all its experts
        ("e3b", 12_000_000_000),  # effective 3B, twice that stored (per-layer embeddings)
        ("30B-A3B", 60_000_000_000),
    ],
)
def test_parameter_counts_in_names(name, expected):
    assert R.parse_size_name(name) == expected


@pytest.mark.parametrize("name", ["large", "26b-a", "e", "4b-it", "b4", "26b-a4b-x"])
def test_names_without_a_count_say_nothing(name):
    assert R.parse_size_name(name) is None


def test_estimate_says_which_basis_it_used():
    assert R.estimate("e4b").basis == "table"
    assert R.estimate("e4b").total == R.SIZE_BYTES["e4b"]
    assert R.estimate("40b-a6b").basis == "parameters"
    assert R.estimate("huge").basis == "default"
