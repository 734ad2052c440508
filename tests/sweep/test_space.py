"""Search-space helpers, sweep loading and checking, run dir names (nothing is trained)."""

from __future__ import annotations

import pytest

from jaxformer.config import ConfigError
from jaxformer.sweep.space import (
    choice,
    format_arg,
    grid,
    load_sweep,
    log_uniform,
    point_names,
    product,
    random_search,
    seeds,
    uniform,
)
from tests.sweep.helpers import write_experiment


def test_grid_is_the_cartesian_product_last_axis_fastest():
    points = grid(**{"train.lr": [1e-3, 3e-3]}, model__dropout=[0.0, 0.1])
    assert points == [
        {"train.lr": 1e-3, "model.dropout": 0.0}, {"train.lr": 1e-3, "model.dropout": 0.1},
        {"train.lr": 3e-3, "model.dropout": 0.0}, {"train.lr": 3e-3, "model.dropout": 0.1}]
    assert grid({"train.lr": [1.0]}) == [{"train.lr": 1.0}]
    with pytest.raises(ConfigError, match="list of values"):
        grid(train__lr=1e-3)


def test_product_seeds_and_concatenation():
    points = product(grid(train__lr=[1e-3, 1e-2]), seeds(0, 1))
    assert points == [{"train.lr": 1e-3, "train.seed": 0}, {"train.lr": 1e-3, "train.seed": 1},
                      {"train.lr": 1e-2, "train.seed": 0}, {"train.lr": 1e-2, "train.seed": 1}]
    assert len(points + seeds(5)) == 5
    assert seeds(3, key="data.seed") == [{"data.seed": 3}]
    with pytest.raises(ConfigError, match="train.seed"):
        product(seeds(0), seeds(1))


def test_random_search_is_reproducible_and_in_range():
    a = random_search(20, seed=3, train__lr=log_uniform(1e-4, 1e-2),
                      model__dropout=uniform(0.0, 0.2), model__norm=choice("layernorm", "rmsnorm"),
                      train__steps=7)
    assert a == random_search(20, seed=3, train__lr=log_uniform(1e-4, 1e-2),
                              model__dropout=uniform(0.0, 0.2),
                              model__norm=choice("layernorm", "rmsnorm"), train__steps=7)
    assert a != random_search(20, seed=4, train__lr=log_uniform(1e-4, 1e-2),
                              model__dropout=uniform(0.0, 0.2),
                              model__norm=choice("layernorm", "rmsnorm"), train__steps=7)
    for p in a:
        assert 1e-4 <= p["train.lr"] <= 1e-2 and 0.0 <= p["model.dropout"] <= 0.2
        assert p["model.norm"] in ("layernorm", "rmsnorm") and p["train.steps"] == 7
        assert float(f"{p['train.lr']:.4g}") == p["train.lr"]  # 4 significant digits
    assert {p["model.norm"] for p in a} == {"layernorm", "rmsnorm"}
    with pytest.raises(ConfigError):
        log_uniform(0.0, 1.0)
    with pytest.raises(ConfigError):
        uniform(1.0, 1.0)


def test_point_names_are_compact_safe_and_unique():
    names = point_names([{"train.lr": 1e-3, "train.seed": 1}, {"train.lr": 1e-5},
                         {"train.lr": 0.1 + 0.2}, {}, {"data.source": "/data/x y"},
                         {"model.dropout": True}, {"sample.prompts": ("a", "b")}])
    assert names == ["lr=0.001,seed=1", "lr=1e-05", "lr=0.30000000000000004", "base",
                     "source=_data_x_y", "dropout=true", "prompts=a+b"]
    # two keys sharing their last component are shown in full
    assert point_names([{"train.seed": 0, "data.seed": 1, "train.lr": 2.0}]) == [
        "train.seed=0,data.seed=1,lr=2"]
    assert point_names([{"data.source": "a/b"}, {"data.source": "a_b"}]) == [
        "source=a_b", "source=a_b-1"]
    assert len(point_names([{"data.source": "x" * 500}])[0]) <= 120
    assert format_arg(1e-3) == "0.001" and format_arg(False) == "false"
    assert format_arg(("a", "b")) == '["a", "b"]'


def test_load_sweep_resolves_every_point(tmp_path):
    path = write_experiment(tmp_path / "exp.py",
                            'product(grid(**{"train.lr": [0.001, 0.01]}), seeds(0, 1)) + '
                            '[{"sample.prompts": ["a"], "train.steps": 6}]')
    sweep = load_sweep(path, ["train.batch_size=2"])
    assert [p.name for p in sweep.points] == ["lr=0.001,seed=0", "lr=0.001,seed=1",
                                              "lr=0.01,seed=0", "lr=0.01,seed=1",
                                              "prompts=a,steps=6"]
    last = sweep.points[-1]
    assert last.cfg.sample.prompts == ("a",) and last.cfg.train.steps == 6
    assert last.cfg.train.batch_size == 2 and sweep.base.train.batch_size == 2
    assert last.args == ['sample.prompts=["a"]', "train.steps=6"]
    assert sweep.points[1].cfg.train.lr == 0.001 and sweep.points[1].cfg.train.seed == 1
    # an int where a float is declared is fine and becomes a float
    sweep = load_sweep(write_experiment(tmp_path / "b.py", '[{"train.lr": 1}]'))
    assert sweep.points[0].overrides == {"train.lr": 1.0} and sweep.points[0].name == "lr=1"


@pytest.mark.parametrize("sweep, overrides, needles", [
    ('[{"train.lrr": 0.1}]', [], ["unknown config key 'train.lrr'", "'train.lr'"]),
    ("[]", [], ["empty"]),
    ('{"train.lr": 0.1}', [], ["sweep() returned dict", "list"]),
    ('[{"train.lr": 0.1}]', ["train.lr=0.2"], ["conflicting overrides", "train.lr"]),
    ('[{"train.steps": "ten"}]', [], ["train.steps", "'ten'", "int"]),
    ('[{"train.steps": 2.5}]', [], ["train.steps", "2.5", "int"]),
    ('[{"train.lr": -1.0}]', [], ["train.lr", "positive"]),
    ('[{"train.lr": 0.1}, {"train.lr": 0.1}]', [], ["duplicates", "0", "1"]),
    ('[{"train.seed": 0}, {}]', [], ["duplicates"]),  # seed 0 is the default
    ('[0.1]', [], ["sweep point 0", "dict"]),
])
def test_bad_sweeps_are_config_errors(tmp_path, sweep, overrides, needles):
    path = write_experiment(tmp_path / "exp.py", sweep)
    with pytest.raises(ConfigError) as info:
        load_sweep(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_sweep_function(tmp_path):
    path = write_experiment(tmp_path / "exp.py", "[]", define_sweep=False)
    with pytest.raises(ConfigError, match="no sweep"):
        load_sweep(path)
