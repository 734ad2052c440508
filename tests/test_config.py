from __future__ import annotations

import pytest

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError


def test_overrides_parse_to_field_types():
    cfg = config_lib.apply_overrides(Config(), [
        "model.d_model=128", "train.lr=1e-4", "data.source=/tmp/x", "sample.prompts=[\"a\"]"])
    assert cfg.model.d_model == 128 and isinstance(cfg.model.d_model, int)
    assert cfg.train.lr == 1e-4
    assert cfg.data.source == "/tmp/x"
    assert cfg.sample.prompts == ("a",)


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'model.d_model'"):
        config_lib.apply_overrides(Config(), ["model.dmodel=3"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"train.steps: 'ten' is not a valid int"):
        config_lib.apply_overrides(Config(), ["train.steps=ten"])


def test_semantic_validation():
    with pytest.raises(ConfigError, match="not divisible"):
        config_lib.apply_overrides(Config(), ["model.n_heads=3"])
    with pytest.raises(ConfigError, match="must be positive"):
        config_lib.apply_overrides(Config(), ["train.steps=0"])


def test_json_round_trip_and_diff():
    cfg = config_lib.apply_overrides(Config(), ["train.steps=700"])
    back = config_lib.from_dict(config_lib.to_dict(cfg))
    assert back == cfg
    assert config_lib.diff(Config(), cfg) == ["train.steps: 1000 -> 700"]
