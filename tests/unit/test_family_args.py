"""``--family-arg KEY=VALUE``: parsed against the family's constructor, refused clearly when
bad, and reaching the family built."""

from __future__ import annotations

import pytest

from stream_meta.cli.common import UsageError, family_for, parse_family_args


def test_values_take_the_type_of_the_argument_default() -> None:
    args = parse_family_args("bandit", ["archetypes=16", "spread=0.6", "noise-std=1"])
    assert args == {"archetypes": 16, "spread": 0.6, "noise_std": 1.0}
    assert isinstance(args["noise_std"], float) and isinstance(args["archetypes"], int)
    assert parse_family_args("bandit", []) == {}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["spred=0.6"], "no argument 'spred'; known: dim, archetypes, spread"),
        (["archetypes=1.5"], "archetypes must be an int, got '1.5'"),
        (["spread=wide"], "spread must be a float"),
        (["spread"], "expected KEY=VALUE"),
        (["spread="], "expected KEY=VALUE"),
        (["spread=0.1", "spread=0.2"], "given twice"),
    ],
)
def test_bad_pairs_are_refused_with_the_reason(pairs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_family_args("bandit", pairs)


def test_the_cli_owned_split_is_not_a_family_arg() -> None:
    with pytest.raises(UsageError, match="no argument 'split'"):
        parse_family_args("digits", ["split=test"])


def test_a_population_change_reaches_the_family() -> None:
    family = family_for("bandit", split="train", args=parse_family_args("bandit", ["quality=0"]))
    assert family.quality == 0.0 and family.archetypes == 4
    diffuse = family_for(
        "bandit", split="train", args=parse_family_args("bandit", ["archetypes=16", "spread=0.6"])
    )
    assert diffuse.centres.shape == (16, 5) and diffuse.spread == 0.6


def test_a_value_the_family_refuses_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="spread must be >= 0"):
        family_for("bandit", split="train", args={"spread": -1.0})
    with pytest.raises(UsageError, match="archetypes must be >= 1"):
        family_for("bandit", split="train", args={"archetypes": 0})
