"""Training objectives: one module per objective (a registered ``Objective``), the shared
task helpers, and the weighted cross-entropy loss.

Importing this package registers the built-in objectives and gives the config schema the
``objective.kind`` choices and the objectives' own checks.
"""

from jaxformer import config as _config
from jaxformer.objectives import (  # noqa: F401 - each module registers its objective
    captioning,
    causal,
    classification,
    masked_lm,
    permutation_lm,
    prefix_lm,
    seq2seq,
    span_corruption,
    token_classification,
    transcription,
)
from jaxformer.objectives.base import Objective, Task
from jaxformer.objectives.registry import OBJECTIVES, check_objective, get_objective, register

_config.register_choices("objective.kind", tuple(OBJECTIVES))
_config.register_check(check_objective)

__all__ = ["OBJECTIVES", "Objective", "Task", "check_objective", "get_objective", "register"]
