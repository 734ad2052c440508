"""``train.teacher``: the teacher model of knowledge distillation (Hinton et al. 2015).

The teacher is a jaxformer run dir: its own saved config builds its model (another size or
architecture than the student's is fine), and its latest checkpoint gives the weights. It must
predict over the student's vocabulary: the same objective, the same ``model.vocab_size`` and
the same tokenizer (the token -> id table and how text is split, compared file to file, not
only by size). Every check runs before the student's run dir is written.

The weights are loaded once per invocation, placed by the student's sharding rules, and passed
to the jitted train step as an argument that is not donated (``bind``); they are never part of
the train state, so checkpoints, the optimizer and gradients never see them. A resumed run
reloads them from the same dir (the dir's latest checkpoint, so do not train the teacher on
in between if the resume is to repeat the uninterrupted run exactly).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.nn.attention_kernels import resolve_implementation
from jaxformer.objectives import get_objective
from jaxformer.parallel.sharding import Rules, param_shardings, with_shardings
from jaxformer.parallel.target import target_platform
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run, read_run_config

# The parts of a tokenizer.json that decide which ids a text becomes (decoder, padding and
# truncation settings do not).
_TOKENIZING_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What the train step needs of the teacher: its graph, its objective's model call and the
    shardings of its weights (the weights themselves are an argument of the step)."""

    run_dir: Path
    cfg: Config  # the teacher's saved config, its model in the looped layout
    graphdef: nnx.GraphDef
    forward: Callable[..., jax.Array]  # Objective.logits: (model, batch, rng) -> [B, T, V]
    params_sharding: dict[str, Any]  # NamedShardings by the student's rules
    alpha: float
    temperature: float

    def logits(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        """The teacher's logits [B, T, V] on the student's batch: deterministic (no dropout
        key) and without gradient."""
        model = nnx.merge(self.graphdef, params)
        return jax.lax.stop_gradient(self.forward(model, batch, None))

    def abstract_params(self) -> dict[str, Any]:
        """The teacher's weights as ShapeDtypeStructs with their shardings (for lowering the
        step without loading them: ``jaxformer compile``)."""
        return with_shardings(nnx.to_pure_dict(abstract_model(self.cfg.model)[1]),
                              self.params_sharding)

    def load_params(self, echo: Callable[[str], None] = print) -> dict[str, Any]:
        """The weights of the teacher's newest readable checkpoint, placed on the mesh."""
        _, params = load_run(self.run_dir, warn=echo)
        n = sum(x.size for x in jax.tree.leaves(params))
        echo(f"teacher: {self.run_dir} ({n:,} parameters), distill_alpha {self.alpha}, "
             f"distill_temperature {self.temperature}")
        return jax.device_put(params, self.params_sharding)


def bind(step: Callable[..., Any], *teacher_params: Any) -> Callable[..., Any]:
    """``step(state, batch)`` of a train step that also takes the teacher's weights (``step``
    itself without them)."""
    if not teacher_params:
        return step
    return lambda state, batch: step(state, batch, *teacher_params)


def teacher_for(cfg: Config, mesh: Mesh, rules: Rules) -> Teacher | None:
    """The teacher of ``cfg`` (None without ``train.teacher``). Checks what the teacher's saved
    config alone can tell (objective, vocabulary size, a checkpoint to load); a UserError
    names the first mismatch. The tokenizer is compared by ``check_tokenizer``."""
    if not cfg.train.teacher:
        return None
    where = Path(cfg.train.teacher)
    try:
        their = read_run_config(where)
    except UserError as e:
        raise UserError(f"train.teacher: {e}") from None
    kind, their_kind = cfg.objective.kind, their.objective.kind
    if cfg.model.num_labels or their.model.num_labels:
        raise UserError(f"train.teacher: distillation matches distributions over the "
                        f"vocabulary, and a classifier (model.num_labels > 0; objective "
                        f"{kind!r}, teacher {their_kind!r}) predicts labels")
    if kind != their_kind:
        raise UserError(f"train.teacher: {where} was trained with objective.kind="
                        f"{their_kind!r}, the student with {kind!r}; the teacher must predict "
                        "the same targets from the same batch")
    if their.model.vocab_size != cfg.model.vocab_size:
        raise UserError(f"train.teacher: {where} has another vocabulary: model.vocab_size="
                        f"{their.model.vocab_size}, the student's {cfg.model.vocab_size}")
    if their.model.max_len < cfg.data.seq_len:
        raise UserError(f"train.teacher: {where} reads at most model.max_len="
                        f"{their.model.max_len} tokens, the student's rows have data.seq_len="
                        f"{cfg.data.seq_len}")
    if not Checkpointer.exists(where / rundir.CHECKPOINT_DIR):
        raise UserError(f"train.teacher: {where} has no checkpoint yet")
    # The blocks as a list: load_run returns every checkpoint in that layout.
    model = dataclasses.replace(their.model, scan_layers=False)
    try:  # its kernel may be one of the machine it trained on (cudnn on a CPU student)
        resolve_implementation(model.attention, target_platform())
    except ValueError as e:
        raise UserError(f"train.teacher: {where} uses model.attention={model.attention!r}: "
                        f"{e}") from None
    graphdef, abstract = abstract_model(model)
    return Teacher(run_dir=where, cfg=dataclasses.replace(their, model=model),
                   graphdef=graphdef, forward=get_objective(their_kind).logits,
                   params_sharding=param_shardings(abstract, mesh, rules),
                   alpha=cfg.train.distill_alpha, temperature=cfg.train.distill_temperature)


def check_tokenizer(teacher: Teacher, tokenizer: Tokenizer | None) -> None:
    """The student's tokenizer must be the teacher's (same ids for the same text): a
    UserError naming what differs. None (a task without a tokenizer) is refused too."""
    where = teacher.run_dir
    if tokenizer is None:
        raise UserError(f"train.teacher: objective {teacher.cfg.objective.kind!r} on this data "
                        "has no tokenizer to match the teacher's vocabulary with")
    path = where / rundir.TOKENIZER_FILE
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"train.teacher: {path} is not a readable tokenizer ({e})") from None
    ours = json.loads(tokenizer.to_str())
    their_vocab = Tokenizer.from_str(json.dumps(theirs)).get_vocab(with_added_tokens=True)
    our_vocab = tokenizer.get_vocab(with_added_tokens=True)
    if their_vocab != our_vocab:
        differ = sorted(set(their_vocab.items()) ^ set(our_vocab.items()))
        raise UserError(f"train.teacher: {where} has another vocabulary: {len(their_vocab)} "
                        f"tokens, the student's tokenizer {len(our_vocab)}, "
                        f"{len(differ)} (token, id) pairs differ (e.g. {differ[0]!r}); a new run "
                        f"reads RUN_DIR/{rundir.TOKENIZER_FILE} when it exists: copy {path} there")
    for part in _TOKENIZING_PARTS:
        if theirs.get(part) != ours.get(part):
            raise UserError(f"train.teacher: {where}'s tokenizer has the same vocabulary but "
                            f"another {part!r} section: the same text would become other ids")
