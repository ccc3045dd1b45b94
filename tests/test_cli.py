"""The command line: every knob is a flag, presets, and bad input named before anything loads."""

import dataclasses

import pytest

from minikv.cli import KNOB_FLAGS, build_parser, config_from_args
from minikv.config import MiniKVConfig, from_preset


def _config(*argv):
    return config_from_args(build_parser().parse_args(["generate", *argv]))


def test_every_knob_is_a_flag():
    fields = {f.name for f in dataclasses.fields(MiniKVConfig)} - {"max_new_tokens"}
    assert set(KNOB_FLAGS) == fields


def test_flags_not_given_take_the_defaults_and_given_ones_override_a_preset():
    assert _config() == MiniKVConfig()
    assert _config("--preset", "paper") == from_preset("paper")
    cfg = _config(
        "--preset",
        "paper",
        "--bits",
        "4",
        "--clip",
        "--rotate",
        "kv",
        "--k-bits",
        "4",
        "--sink-tokens",
        "8",
        "--budget",
        "none",
        "--scorer",
        "a2sf",
        "--crush",
        "0.25",
    )
    assert cfg == from_preset(
        "paper", bits=4, clip=True, rotate="kv", k_bits=4, sink_tokens=8, budget=None, scorer="a2sf", crush=0.25
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--budget", "abc"], "budget must be an int >= 1 (tokens), a float in (0, 1]"),
        (["--recent", "x"], "recent must be an int >= 0 (tokens) or a float in [0, 1]"),
        (["--rotate", "q"], "invalid choice: 'q'"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_flags_are_named(argv, words, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", *argv])
    assert words in capsys.readouterr().err


def test_bad_knob_values_are_refused_by_the_config():
    with pytest.raises(ValueError, match="k_bits must be one of"):
        _config("--k-bits", "3")
