"""Every documented choice of every choice-valued config key trains: through the real set-up
(``jaxformer.train.loop.train``: data, tokenizer, model, sharded state, compiled step,
evaluation, checkpoint), not only a module's forward pass, for two steps of a tiny model.

The choices come from the code (``jaxformer.config._CHOICES``), so a choice added later is a
new test case here without editing this file. Most keys need nothing but ``key=choice`` on a
tiny GPT (``GENERIC``); some choices need a few more overrides on it (MLA's widths, MoE for the
expert mesh preset), and objectives, architectures and the choices only an image encoder takes
(``OWN_RECIPE``: the 2-D sin-cos positions) need an experiment of their own; a key
or choice without a recipe fails ``test_every_choice_has_a_recipe`` with its name. Attention
kernels that cannot run on this backend must end in a ``UserError`` before the run dir is
touched.

Compiling is what costs (each distinct config compiles its init, train and eval steps), so the
choices of the keys that can be set together share runs: combination i sets the i-th choice of
every such key at once (``test_combination_trains``), and the per-choice cases read their run's
outcome. When a combination fails, each of its choices is trained alone, so the failing case
names the culprit. Identical configs train once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import pytest

from jaxformer import config as config_lib
from jaxformer.errors import UserError
from jaxformer.nn.attention_kernels import resolve_implementation
from jaxformer.runs import rundir
from jaxformer.train.loop import TrainResult, train
from tests.corpus import GENERATED_SOURCES, write_corpus

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STEPS = 2

# Shrinks any experiment to a two-step run: 1 layer of width 32, batch 2, one eval batch, a
# checkpoint at the end, no samples.
TINY = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "train.batch_size=2", f"train.steps={STEPS}", "train.warmup_steps=1",
        f"eval.every={STEPS}", "eval.batches=1", "log.every=1", f"checkpoint.every={STEPS}",
        "sample.count=0", "sample.prompts=[]")
# Text experiments read the tiny corpus with a small vocabulary and short rows.
TEXT = ("model.vocab_size=320", "data.seq_len=32", "model.max_len=32")

Recipe = tuple[str, tuple[str, ...]]  # (experiment file stem, overrides)
GPT: Recipe = ("gpt_tiny", TEXT)
GENERIC = "GENERIC"  # key=choice on the tiny GPT, nothing else

# Keys whose choices are set on the tiny GPT, together: GENERIC, or per choice the overrides
# it needs beyond key=choice (which must not set another key of this table).
ONE_DEVICE_TENSOR = ("mesh.tensor=1",) if jax.device_count() < 2 else ()  # fsdp_tensor asks 2
COMBINABLE: dict[str, str | dict[object, tuple[str, ...]]] = {
    "model.pos_encoding": GENERIC,
    "model.norm": GENERIC,
    "model.norm_position": GENERIC,
    "model.activation": GENERIC,
    "model.attention": GENERIC,  # only the kernels this backend runs; the rest: UserError
    "model.param_dtype": GENERIC,
    "model.compute_dtype": GENERIC,
    "model.remat": GENERIC,
    "model.scan_layers": GENERIC,
    "train.schedule": GENERIC,
    "checkpoint.on_error": GENERIC,  # what a failed save does; tests/train/test_faults.py fails one
    "data.tokenizer": GENERIC,  # tests/data/test_tokenizer_kinds.py trains each with objectives
    "mesh.preset": {"data": (), "fsdp": (), "sequence": (), "fsdp_tensor": ONE_DEVICE_TENSOR,
                    "expert": ("model.n_experts=2", "model.experts_top_k=1",
                               "model.moe_d_ff=32")},
}
# Keys whose choices each need their own experiment.
OBJECTIVES: dict[object, Recipe] = {
    "causal": GPT,
    "masked_lm": ("bert_tiny", TEXT),
    "prefix_lm": ("prefixlm_tiny", TEXT),
    # XLNet: a two-stream model over sampled factorisation orders
    "permutation_lm": ("xlnet_tiny", TEXT),
    # T5's 100 sentinel tokens need room in the vocabulary
    "span_corruption": ("t5_tiny", (*TEXT, "model.vocab_size=512",
                                    "model.n_decoder_layers=1")),
    # synthetic sequence reversal: its own vocabulary and lengths, no corpus
    "seq2seq": ("transformer_2017", ("model.dropout=0",)),
    # synthesized touch-tone speech -> its transcript: audio batches, no corpus
    "transcription": ("speech_tiny", ("model.dropout=0", "model.audio_mels=16")),
    # generated images of digits -> their captions: an image-prefix decoder, no corpus
    "captioning": ("caption_digits", ("model.dropout=0", "model.vision_layers=1")),
    # which of 2 stdlib packages a snippet is from; trained from scratch here
    "classification": ("bert_classify", (*TEXT, "model.num_labels=2", "train.init_from=",
                                         "model.dropout=0")),
    # the lexical category of each token of the tiny corpus's Python: a per-token head
    "token_classification": ("tag_python", TEXT),
}
BERT: Recipe = OBJECTIVES["masked_lm"]
# A Vision Transformer on the bundled 8x8 digits (no corpus): its own lengths and shapes.
VIT: Recipe = ("vit_digits", ())

# Choices of a COMBINABLE key that mean nothing on the tiny GPT: each trains by its own
# recipe and stays out of the combinations.
OWN_RECIPE: dict[tuple[str, object], Recipe] = {
    ("model.pos_encoding", "sinusoidal_2d"): (VIT[0], (*VIT[1],
                                                       "model.pos_encoding=sinusoidal_2d")),
}


def family(recipe: Recipe, name: str, *extra: str) -> Recipe:
    """An efficient attention family on a tiny model: 8-token blocks (rows are 32 long)."""
    return recipe[0], (*recipe[1], f"model.attention_type={name}", "model.attention_block=8",
                       *extra)


# Attention families refuse some combinable choices (ALiBi and relative biases), so each
# trains on its own: causal in the GPT, bidirectional in the BERT, one or the other each
# (tests/nn/test_attention_families.py trains every family both ways).
ATTENTION_TYPES: dict[object, Recipe] = {
    "mha": GPT,
    "mla": (GPT[0], (*GPT[1], "model.attention_type=mla", "model.kv_lora_rank=8",
                     "model.qk_rope_head_dim=4", "model.qk_nope_head_dim=8",
                     "model.v_head_dim=8")),
    "longformer": family(BERT, "longformer"),
    "bigbird": family(GPT, "bigbird", "model.sparse_random=1"),
    "performer": family(BERT, "performer", "model.random_features=16"),
    "rfa": family(GPT, "rfa", "model.random_features=16"),
    "linear": family(GPT, "linear"),
    "lsh": family(BERT, "lsh", "model.lsh_buckets=4"),
    "aft_full": family(GPT, "aft_full"),
    "aft_local": family(BERT, "aft_local", "model.sliding_window=4"),
    "aft_simple": family(GPT, "aft_simple"),
}
SEPARATE: dict[str, dict[object, Recipe]] = {
    "objective.kind": OBJECTIVES,
    "model.attention_type": ATTENTION_TYPES,
    "model.arch": {"decoder": OBJECTIVES["causal"], "encoder": OBJECTIVES["masked_lm"],
                   "encoder_decoder": OBJECTIVES["span_corruption"],
                   "image_prefix": OBJECTIVES["captioning"],
                   "xlnet": OBJECTIVES["permutation_lm"]},
    # what the classifier's pooler reads: only a classifier has one
    "model.pooling": {"first": OBJECTIVES["classification"],
                      "mean": (OBJECTIVES["classification"][0],
                               (*OBJECTIVES["classification"][1], "model.pooling=mean"))},
}
# Choice-valued keys that are not in _CHOICES (booleans), covered the same way.
EXTRA_CHOICES = {"model.scan_layers": (False, True)}
ALL_CHOICES = {**config_lib._CHOICES, **EXTRA_CHOICES}


def runs_here(key: str, choice: object) -> bool:
    """False only for an attention kernel this backend has not got (e.g. cudnn on CPU)."""
    if key != "model.attention":
        return True
    try:
        resolve_implementation(str(choice), jax.default_backend())
    except ValueError:
        return False
    return True


CASES = [(key, choice) for key, choices in ALL_CHOICES.items() for choice in choices
         if runs_here(key, choice)]
UNAVAILABLE = [choice for choice in ALL_CHOICES["model.attention"]
               if not runs_here("model.attention", choice)]


def override(key: str, choice: object) -> str:
    return f"{key}={str(choice).lower() if isinstance(choice, bool) else choice}"


def combinable_overrides(key: str, choice: object) -> tuple[str, ...]:
    how = COMBINABLE[key]
    if how != GENERIC and choice not in how:
        pytest.fail(f"{key}={choice!r} has no recipe: add its overrides to COMBINABLE")
    return (*(() if how == GENERIC else how[choice]), override(key, choice))


def runnable_choices(key: str) -> list[object]:
    """The choices of a combinable key that the combinations cycle through."""
    return [choice for choice in ALL_CHOICES[key]
            if runs_here(key, choice) and (key, choice) not in OWN_RECIPE]


N_COMBINATIONS = max(len(runnable_choices(key)) for key in COMBINABLE)


def combination(i: int) -> dict[str, object]:
    """{key: choice}: the i-th choice of every combinable key (cycling through short lists)."""
    return {key: runnable_choices(key)[i % len(runnable_choices(key))] for key in COMBINABLE}


def build_config(recipe: Recipe, corpus: Path) -> config_lib.Config:
    experiment, overrides = recipe
    cfg = config_lib.load_experiment(EXPERIMENTS / f"{experiment}.py")
    generated = cfg.data.source.startswith(GENERATED_SOURCES)  # no corpus
    data = () if generated else (f"data.source={corpus}",)
    return config_lib.apply_overrides(cfg, [*TINY, *data, *overrides])


def combination_recipe(choices: dict[str, object]) -> Recipe:
    experiment, overrides = GPT
    extra = [o for key, choice in choices.items() for o in combinable_overrides(key, choice)]
    return experiment, (*overrides, *extra)


@dataclasses.dataclass
class Outcome:
    cfg: config_lib.Config
    run_dir: Path
    result: TrainResult | None = None
    error: BaseException | None = None

    def check(self, *settings: tuple[str, object]) -> None:
        """The run trained STEPS steps to finite losses, evaluated, checkpointed, and its run
        dir records ``settings`` (the choices were not dropped on the way)."""
        if self.error is not None:
            raise self.error
        result = self.result
        assert result.final_step == STEPS
        assert sorted(result.losses) == list(range(1, STEPS + 1))
        assert all(math.isfinite(v) and v > 0 for v in result.losses.values()), result.losses
        assert math.isfinite(result.evals[STEPS])
        assert rundir.latest_checkpoint_step(self.run_dir) == STEPS
        saved = rundir.read_config(self.run_dir)
        for key, choice in settings:
            assert config_lib.get_key(saved, key) == choice, key


@pytest.fixture(scope="module", autouse=True)
def _stated_peak():
    """A stated peak FLOP/s: the MFU in the logs needs one, and measuring it costs seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMER_PEAK_FLOPS", "1e11")
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One small corpus for every case: its tokenizer and tokens are cached after the first
    case that reads it (the token cache is keyed by the data settings, shared by most)."""
    return write_corpus(tmp_path_factory.mktemp("every_choice") / "corpus", n_docs=60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """Trains a recipe once (per distinct config) and remembers the outcome, error included."""
    done: dict[str, Outcome] = {}

    def run(recipe: Recipe) -> Outcome:
        cfg = build_config(recipe, corpus)
        fingerprint = json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str)
        if fingerprint not in done:
            outcome = Outcome(cfg, tmp_path_factory.mktemp("run"))
            try:
                outcome.result = train(cfg, outcome.run_dir, progress=False,
                                       echo=lambda _: None)
            except Exception as e:  # reported by the cases that read this outcome
                outcome.error = e
            done[fingerprint] = outcome
        return done[fingerprint]

    return run


def test_every_choice_has_a_recipe():
    """A key added to _CHOICES needs a recipe; a per-choice recipe needs every choice."""
    covered = set(COMBINABLE) | set(SEPARATE)
    assert sorted(set(ALL_CHOICES) - covered) == []
    assert sorted(covered - set(ALL_CHOICES)) == []  # no stale keys
    missing = [f"{key}={choice}" for table in (COMBINABLE, SEPARATE)
               for key, how in table.items() if how != GENERIC
               for choice in ALL_CHOICES[key] if choice not in how]
    assert missing == []


@pytest.mark.parametrize("i", range(N_COMBINATIONS))
def test_combination_trains(i, trained):
    choices = combination(i)
    outcome = trained(combination_recipe(choices))
    if outcome.error is not None:
        pytest.fail(f"combination {i} ({', '.join(override(k, v) for k, v in choices.items())})"
                    f" fails: {type(outcome.error).__name__}: {outcome.error}")
    outcome.check(*choices.items())


@pytest.mark.parametrize("key,choice", CASES, ids=[override(k, v) for k, v in CASES])
def test_choice_trains(key, choice, trained):
    if (key, choice) in OWN_RECIPE:
        trained(OWN_RECIPE[key, choice]).check((key, choice))
        return
    if key in SEPARATE:
        recipes = SEPARATE[key]
        if choice not in recipes:
            pytest.fail(f"{key}={choice!r} has no recipe: add an experiment and overrides to "
                        "SEPARATE")
        trained(recipes[choice]).check((key, choice))
        return
    i = runnable_choices(key).index(choice)
    outcome = trained(combination_recipe(combination(i)))
    if outcome.error is not None:  # alone, to tell whether this choice is the culprit
        outcome = trained(combination_recipe({key: choice}))
    outcome.check((key, choice))


@pytest.mark.skipif(not UNAVAILABLE, reason="every attention kernel runs on this backend")
@pytest.mark.parametrize("choice", UNAVAILABLE)
def test_unavailable_kernel_is_a_user_error(choice, corpus, tmp_path):
    cfg = build_config(combination_recipe({"model.attention": choice}), corpus)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=f"model.attention.*{choice}") as info:
        train(cfg, run_dir, progress=False, echo=lambda _: None)
    assert "\n" not in str(info.value) and jax.default_backend() in str(info.value)
    assert not run_dir.exists()  # found before anything was written
