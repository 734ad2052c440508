"""Objectives by name (``objective.kind``), and the config checks they own.

Importing ``jaxformer.objectives`` registers every built-in objective and hands the config
schema the list of ``objective.kind`` choices and the check below, so a bad objective option is
a one-line error at load time like any other bad value.
"""

from __future__ import annotations

import difflib

from jaxformer.config import Config, ConfigError
from jaxformer.data.tokenizer_kinds import KINDS
from jaxformer.objectives.base import Objective

OBJECTIVES: dict[str, Objective] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes ``cls`` the objective named ``cls.name``."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls()
    return cls


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        near = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"bad value for objective.kind: {name!r}{hint} (choose one of "
                          f"{', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def check_objective(cfg: Config) -> None:
    """The objective exists, fits the model's architecture and the kind of tokenizer, and its
    options make sense."""
    objective = get_objective(cfg.objective.kind)
    if cfg.model.arch != objective.arch:
        raise ConfigError(f"objective.kind={objective.name!r} trains model.arch="
                          f"{objective.arch!r}, but the model is {cfg.model.arch!r}")
    kind = KINDS.get(cfg.data.tokenizer)  # an unknown kind is the choice check's error
    for role in objective.special_roles:
        if kind is not None and not kind.supports(role):
            able = ", ".join(k.name for k in KINDS.values() if k.supports(role))
            raise ConfigError(f"objective.kind={objective.name!r} needs {role} tokens, which "
                              f"data.tokenizer={kind.name!r} has not got; use one of {able}")
    try:
        objective.check(cfg)
    except ValueError as e:
        raise ConfigError(f"objective: {e}") from None
