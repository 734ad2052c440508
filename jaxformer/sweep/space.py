"""Sweep definitions: search-space helpers for experiment files, and loading a sweep.

An experiment file defines ``sweep()`` next to ``config()``; it returns a list of points, each
a dict of dotted config keys to values (``{"train.lr": 1e-3, "train.seed": 1}``). The helpers
build such lists::

    grid(**{"train.lr": [1e-3, 3e-3]})          # 2 points
    grid(train__lr=[1e-3, 3e-3])                # the same ("__" stands for ".")
    product(grid(train__lr=[1e-3, 3e-3]), seeds(0, 1))   # 4 points
    random_search(8, seed=0, train__lr=log_uniform(1e-4, 1e-2), model__dropout=choice(0.0, 0.1))
    grid(train__lr=[1e-3]) + grid(train__lr=[3e-3], train__warmup_steps=[0])  # concatenation

``load_sweep`` imports the file and checks every point before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxformer import config as config_lib
from jaxformer import objectives  # noqa: F401 - registers objective.kind and its checks
from jaxformer.config import Config, ConfigError

SweepPoint = dict[str, object]


def _axes(axes: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merges a dict of dotted keys with keyword arguments whose ``__`` stands for ``.``."""
    merged = dict(axes or {})
    for key, value in kwargs.items():
        merged[key.replace("__", ".")] = value
    return merged


def grid(axes: dict[str, Sequence[object]] | None = None, /,
         **kwargs: Sequence[object]) -> list[SweepPoint]:
    """The cartesian product of the axes, in order (the last axis varies fastest)."""
    merged = _axes(axes, kwargs)
    for key, values in merged.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise ConfigError(f"grid axis {key!r} must be a list of values, got {values!r}")
    keys = list(merged)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(merged[k] for k in keys))]


def seeds(*values: int, key: str = "train.seed") -> list[SweepPoint]:
    """One point per seed: ``seeds(0, 1, 2)``."""
    return [{key: v} for v in values]


def product(*point_lists: list[SweepPoint]) -> list[SweepPoint]:
    """Every combination of one point from each list, merged (the lists share no key)."""
    out = []
    for combo in itertools.product(*point_lists):
        merged: SweepPoint = {}
        for point in combo:
            shared = set(merged) & set(point)
            if shared:
                raise ConfigError(f"product: key {sorted(shared)[0]!r} is in more than one list")
            merged.update(point)
        out.append(merged)
    return out


# --- random search ---------------------------------------------------------------------------


class Distribution:
    """A distribution ``random_search`` draws values from."""

    def sample(self, rng: random.Random) -> object:
        raise NotImplementedError


def _round(x: float, digits: int) -> float:
    """``x`` to ``digits`` significant digits (short run names, exactly reproducible)."""
    return float(f"{x:.{digits}g}") if digits > 0 else x


@dataclasses.dataclass(frozen=True)
class _Uniform(Distribution):
    lo: float
    hi: float
    log: bool
    digits: int

    def sample(self, rng: random.Random) -> float:
        if self.log:
            return _round(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))),
                          self.digits)
        return _round(rng.uniform(self.lo, self.hi), self.digits)


@dataclasses.dataclass(frozen=True)
class _Choice(Distribution):
    values: tuple[object, ...]

    def sample(self, rng: random.Random) -> object:
        return self.values[rng.randrange(len(self.values))]


def uniform(lo: float, hi: float, digits: int = 4) -> Distribution:
    """Uniform in [lo, hi], rounded to ``digits`` significant digits (0: no rounding)."""
    if not lo < hi:
        raise ConfigError(f"uniform({lo}, {hi}) needs lo < hi")
    return _Uniform(float(lo), float(hi), False, digits)


def log_uniform(lo: float, hi: float, digits: int = 4) -> Distribution:
    """Log-uniform in [lo, hi] (0 < lo < hi), e.g. learning rates."""
    if not 0 < lo < hi:
        raise ConfigError(f"log_uniform({lo}, {hi}) needs 0 < lo < hi")
    return _Uniform(float(lo), float(hi), True, digits)


def choice(*values: object) -> Distribution:
    """One of ``values``, each equally likely."""
    if not values:
        raise ConfigError("choice() needs at least one value")
    return _Choice(tuple(values))


def random_search(n: int, seed: int = 0, axes: dict[str, object] | None = None, /,
                  **dists: object) -> list[SweepPoint]:
    """``n`` points, each key drawn from its distribution (a plain value is used as is)."""
    rng = random.Random(seed)
    merged = _axes(axes, dists)
    return [{k: d.sample(rng) if isinstance(d, Distribution) else d for k, d in merged.items()}
            for _ in range(n)]


# --- loading and checking a sweep ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    index: int
    name: str  # the run dir's name inside the sweep dir, e.g. "lr=0.001,seed=1"
    overrides: dict[str, object]  # dotted key -> value, as typed in the config
    cfg: Config  # the experiment with the command line's --set and this point applied

    @property
    def args(self) -> list[str]:
        """The point as ``KEY=VALUE`` strings for ``jaxformer train --set``."""
        return [f"{k}={format_arg(v)}" for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
    experiment: Path
    base_overrides: tuple[str, ...]  # the command line's --set, applied to every point
    base: Config
    points: tuple[Point, ...]


def load_sweep(path: str | Path, base_overrides: Sequence[str] = ()) -> Sweep:
    """Imports an experiment file, applies ``base_overrides`` and checks its ``sweep()``.

    Raises ConfigError (one line) for an unknown key, a value of the wrong type, an empty or
    malformed sweep, a key also set on the command line, or two points that train the same.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    module = config_lib._import_file(path)
    make = getattr(module, "config", None)
    if not callable(make):
        raise ConfigError(f"{path} defines no config() function returning a jaxformer Config")
    cfg = make()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, expected Config")
    base = config_lib.apply_overrides(config_lib.validate(cfg), list(base_overrides))
    define = getattr(module, "sweep", None)
    if not callable(define):
        raise ConfigError(f"{path} defines no sweep() function returning a list of points "
                          "(dicts of config keys to values)")
    raw = define()
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"{path}: sweep() returned {type(raw).__name__}, expected a list of "
                          "dicts of config keys to values")
    if not raw:
        raise ConfigError(f"{path}: sweep() returned an empty list; a sweep needs at least one "
                          "point")
    set_keys = {item.split("=", 1)[0].strip() for item in base_overrides}
    checked = [_check_point(path, base, i, p, set_keys) for i, p in enumerate(raw)]
    names = point_names([overrides for overrides, _ in checked])
    points = tuple(Point(i, name, overrides, point_cfg)
                   for i, (name, (overrides, point_cfg)) in enumerate(zip(names, checked,
                                                                           strict=True)))
    seen: dict[Config, Point] = {}
    for point in points:
        if point.cfg in seen:
            first = seen[point.cfg]
            raise ConfigError(f"{path}: sweep points {first.index} ({first.name}) and "
                              f"{point.index} ({point.name}) are duplicates: same config")
        seen[point.cfg] = point
    return Sweep(path, tuple(base_overrides), base, points)


def _check_point(path: Path, base: Config, index: int, point: object,
                 set_keys: set[str]) -> tuple[dict[str, object], Config]:
    where = f"{path.name}: sweep point {index}"
    if not isinstance(point, dict):
        raise ConfigError(f"{where} is {type(point).__name__} {point!r}, expected a dict of "
                          "config keys to values")
    cfg = base
    overrides: dict[str, object] = {}
    for key, value in point.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a dotted config key string")
        if key not in config_lib.all_keys(base):
            try:
                config_lib.set_key(base, key, "")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if key in set_keys:
            raise ConfigError(f"conflicting overrides: {key} is set with --set and by {where} "
                              f"({key}={value!r})")
        typ = typing.get_type_hints(type(config_lib.get_owner(base, key)))[key.split(".")[-1]]
        if not _type_ok(value, typ):
            raise ConfigError(f"{where}: bad value for {key}: {value!r} is not a valid "
                              f"{config_lib._type_name(typ)}")
        try:
            cfg = config_lib.set_key(cfg, key, format_arg(value))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        overrides[key] = config_lib.get_key(cfg, key)
    try:
        cfg = config_lib.validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return overrides, cfg


def _type_ok(value: object, typ: Any) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    if typing.get_origin(typ) is tuple:
        item = typing.get_args(typ)[0]
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    return False


def format_arg(value: object) -> str:
    """A value as the text ``--set KEY=VALUE`` parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)


# --- run dir names ---------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-]")
MAX_NAME = 120


def format_value(value: object) -> str:
    """A compact, exact text of a value: 0.001, 1e-05, 3, true; a list as a+b."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, list | tuple):
        return "+".join(format_value(v) for v in value)
    return str(value)


def point_names(points: Sequence[dict[str, object]]) -> list[str]:
    """Filesystem-safe, unique run dir names: ``lr=0.001,seed=1``.

    Each key is shown by its last component unless two keys of the sweep share it (then by the
    full dotted key); a point without overrides is ``base``.
    """
    keys = {k for p in points for k in p}
    by_last: dict[str, set[str]] = {}
    for k in keys:
        by_last.setdefault(k.split(".")[-1], set()).add(k)

    def label(key: str) -> str:
        last = key.split(".")[-1]
        return last if len(by_last[last]) == 1 else key

    names: list[str] = []
    for i, point in enumerate(points):
        text = ",".join(f"{label(k)}={format_value(v)}" for k, v in point.items()) or "base"
        name = _UNSAFE.sub("_", text)
        if name.startswith("."):
            name = "_" + name[1:]
        if len(name) > MAX_NAME:
            digest = hashlib.sha1(name.encode()).hexdigest()[:8]
            name = f"{name[:MAX_NAME - 9]}-{digest}"
        if name in names:
            name = f"{name}-{i}"
        names.append(name)
    return names
