"""Config fuzzing: any ``--set KEY=VALUE`` a user can type either gives a config that builds a
model, or a one-line ConfigError; never another exception.

The overrides cover the whole schema (``config.all_keys()``), with values of the key's type
and garbage (huge ints, nan, inf, -0, empty strings, unicode, JSON lists of the wrong type) and
keys that do not exist. On the CLI, such a value ends with one ``error:`` line, exit 2 and
nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jaxformer.objectives  # noqa: F401 - registers objective.kind and its checks
from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError
from jaxformer.models.build import abstract_model
from jaxformer.nn.attention_kernels import resolve_implementation
from tests.command_line import EXPERIMENT

BASE = Config()
KEYS = config_lib.all_keys()


def _type(key: str) -> typing.Any:
    owner = config_lib.get_owner(BASE, key)
    return typing.get_type_hints(type(owner))[key.split(".")[-1]]


TYPES = {key: _type(key) for key in KEYS}

GARBAGE = st.sampled_from([
    "", " ", "nan", "-nan", "inf", "-inf", "1e999", "-0", "-0.0", "0", "-1", "1", "2", "1.5",
    str(2**31), str(-2**31), str(2**63), str(10**40), "1e-320", "true", "None", "null", "[]",
    '["a"]', "[1, 2]", '[null]', '{"a": 1}', "ä", "日本語", "\u202e", "\x00", "a=b", "=",
    "0x10", "1_000", "１２",  # full-width digits: int() accepts them
])


def _typed_value(key: str) -> st.SearchStrategy[str]:
    """Text a user could mean for ``key``: numbers around the edges, its choices, lists."""
    typ = TYPES.get(key, str)
    if key in config_lib.choice_keys():
        return st.one_of(st.sampled_from(config_lib.choices(key)), st.text(max_size=12))
    if typ is bool:
        return st.sampled_from(["true", "false", "1", "0", "yes", "off", "maybe"])
    if typ is int:
        return st.one_of(st.integers(-3, 300), st.integers(-2**40, 2**40)).map(str)
    if typ is float:
        return st.one_of(st.floats(-2.0, 2.0), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([1e-9, 0.5, 1.0, 1e4])).map(repr)
    if typing.get_origin(typ) is tuple:
        return st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=3).map(json.dumps)
    return st.text(max_size=12)


@st.composite
def override(draw: st.DrawFn) -> str:
    """One ``KEY=VALUE``: a schema key (rarely a made-up one) with a typed or garbage value."""
    if draw(st.integers(0, 19)) == 0:
        key = draw(st.sampled_from(["model.dmodel", "train", "model.", "x.y.z", "", "Model.arch",
                                    "train.lr.x"]))
    else:
        key = draw(st.sampled_from(KEYS))
    value = draw(st.one_of(_typed_value(key), GARBAGE))
    return f"{key}={value}"


def _check(overrides: list[str]) -> Config | None:
    """apply_overrides' result, or None after a one-line ConfigError; any other exception
    fails the test."""
    try:
        return config_lib.apply_overrides(BASE, overrides)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message, (overrides, message)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(override(), min_size=1, max_size=3))
def test_overrides_give_a_config_or_one_line_error(overrides):
    _check(overrides)


# Small models, so that a valid fuzzed model config is cheap to trace; the overrides that
# follow change one to three keys of it.
SMALL = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.vocab_size=64",
         "model.max_len=32", "data.seq_len=16", "train.batch_size=2"]
MODEL_KEYS = [k for k in KEYS if k.startswith("model.")]


@st.composite
def model_override(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(MODEL_KEYS))
    typ = TYPES[key]
    if typ is int:  # small, so that a config that validates stays cheap to trace
        value = draw(st.one_of(st.integers(-2, 40).map(str), GARBAGE))
    else:
        value = draw(st.one_of(_typed_value(key), GARBAGE))
    return f"{key}={value}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(model_override(), min_size=1, max_size=3))
# Rare corners, always tried: T5 buckets with no exact bucket (a division by zero while
# tracing) or max_distance at the exact buckets' end (log(1) = 0 divides).
@example(["model.arch=encoder", "objective.kind=masked_lm", "model.pos_encoding=t5_relative",
          "model.relative_buckets=3"])
@example(["model.pos_encoding=t5_relative", "model.relative_max_distance=16"])
@example(["model.pos_encoding=rope", "model.rope_fraction=0.01"])
def test_a_model_config_that_validates_builds(overrides):
    cfg = _check(SMALL + overrides)
    if cfg is None:
        return
    m = cfg.model
    # Big shapes are only shapes here (nothing is allocated), but keep tracing quick.
    if m.n_layers * max(m.d_model, m.ff_width) > 10**6:
        return
    # Validation was complete enough: the model can be built, and its forward pass traced
    # (shapes only; a Python-level error such as a division by zero in a position table or a
    # bucketing formula shows up while tracing).
    try:  # a kernel this backend lacks (cudnn on CPU) is refused at run start, not here
        resolve_implementation(m.attention, jax.default_backend())
    except ValueError:
        m = dataclasses.replace(m, attention="auto")
    graphdef, state = abstract_model(m)
    if m.arch == "encoder_decoder":
        return  # built; its forward takes other inputs (the decoder and encoder traces cover
        # the shared blocks)
    tokens = jax.ShapeDtypeStruct((1, cfg.data.seq_len), jnp.int32)
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t, t), state, tokens)
    assert logits.shape == (1, cfg.data.seq_len, m.vocab_size)


def test_every_key_has_a_type_the_fuzzer_knows():
    """A new field of a new type would go unfuzzed (and unparsed: parse_value refuses it)."""
    known = {bool, int, float, str}
    for key, typ in TYPES.items():
        assert typ in known or typing.get_origin(typ) is tuple, (key, typ)
    assert {f.name for f in dataclasses.fields(Config)} >= {"model", "train", "sample"}


@pytest.mark.parametrize("bad", [
    "train.lr=nan", "train.steps=99999999999", "eval.batches=-1", "sample.top_p=0",
    "model.norm_eps=-0", "name=a/b", "train.beta2=1",
])
def test_cli_bad_value_is_one_error_line_and_writes_nothing(tmp_path, capsys, bad):
    run = tmp_path / "run"
    assert cli.main(["train", EXPERIMENT, "--set", bad, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and bad.split("=")[0] in lines[0], err
    assert "Traceback" not in err
    assert not run.exists() and list(tmp_path.iterdir()) == []
