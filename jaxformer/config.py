"""The typed experiment schema, experiment-file loading, and KEY=VALUE overrides.

An experiment is a Python file with a function ``config() -> Config``. Every field below is a
key a user can override from the command line with ``--set section.field=value``; the value is
parsed to the field's declared type and validated before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

from jaxformer.errors import UserError


class ConfigError(UserError):
    """A bad experiment file, key or value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Transformer shape, block choices and numerics. Defaults give the GPT-2 layout; the
    presets in ``jaxformer.models.presets`` set the other families."""

    arch: str = "decoder"  # decoder | encoder | encoder_decoder | image_prefix | xlnet
    n_layers: int = 4  # encoder_decoder: encoder layers
    n_decoder_layers: int = 0  # encoder_decoder: decoder layers; 0 means n_layers
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (multi-head); 1 multi-query; else grouped-query
    head_dim: int = 0  # 0 means d_model // n_heads
    vocab_size: int = 8192
    d_ff: int = 0  # 0 means 4 * d_model, or 8/3 * d_model (multiple of 8) for gated activations
    max_len: int = 1024  # longest sequence the position table (and the KV cache) supports
    # learned | sinusoidal | sinusoidal_2d (images: sin-cos over each patch's row and column)
    # | rope | alibi | t5_relative | shaw | none
    pos_encoding: str = "learned"
    sinusoidal_base: float = 10000.0
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's channels that rotate (partial rotary)
    relative_buckets: int = 32  # t5_relative: log-spaced buckets; shaw: unused
    relative_max_distance: int = 128  # t5_relative: last bucket starts here; shaw: clip offset
    norm: str = "layernorm"  # layernorm | rmsnorm | scalenorm
    norm_position: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x))
    final_norm: bool = True  # a norm after the last block (pre-LN models need it)
    activation: str = "gelu_tanh"  # relu | gelu | gelu_tanh | swiglu | geglu | geglu_tanh
    use_bias: bool = True  # biases in attention and feed-forward projections (and LayerNorm)
    tie_embeddings: bool = True  # un-embed with the token embedding table
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    type_vocab_size: int = 0  # >0: token-type (segment A/B) embeddings (BERT)
    num_labels: int = 0  # >0: a pooled sequence-classification head with this many classes
    # >0: instead, a per-token classification head with this many classes (BERT's
    # BertForTokenClassification: dropout -> dense D->L on every token's final state; no pooler,
    # no masked-LM head), as objective.kind=token_classification trains
    token_labels: int = 0
    # With num_labels: classify PAIRS of sequences, each encoded on its own by the same encoder
    # (LRA's two-tower retrieval); the classifier reads [u, v, u*v, u-v] of the two pooled
    # states (model.pooling). Rows hold the two sequences one after the other.
    two_tower: bool = False
    # What the classifier's pooler reads: first (BERT's [CLS], the first token's final state)
    # | mean (the mean final state over the row's real tokens, segment id > 0)
    pooling: str = "first"
    # With num_labels: a dense D->D + tanh over the pooled state before the classifier (BERT's
    # pooler); False: the classifier reads the pooled state itself (ViTForImageClassification)
    pooler: bool = True
    # Vision Transformer (Dosovitskiy et al. 2021; docs/vision.md): > 0 makes the encoder read
    # images [B, image_size, image_size, image_channels] as non-overlapping patch_size x
    # patch_size patches, each flattened and mapped linearly to d_model (a strided
    # convolution), after a learned [CLS] token when pooling='first'; no token table. 0: tokens.
    patch_size: int = 0
    image_size: int = 0  # with patch_size: the side of the square images, in pixels
    image_channels: int = 0  # with patch_size: channels per pixel (1 grey, 3 RGB)
    # Image-prefix decoder (model.arch='image_prefix'; PaLI / LLaVA-style, docs/vision.md): a
    # ViT of vision_layers blocks (the model's width and block kind, 2-D sin-cos positions, no
    # [CLS]) reads the image; an MLP projector maps its patch states to the decoder's input
    # vectors, a bidirectional prefix before the text (n_layers: the decoder's blocks).
    vision_layers: int = 0
    freeze_vision: bool = False  # with vision_layers: the vision tower is not trained
    # Whisper-style speech recognizer (Radford et al. 2022; docs/speech.md): > 0 makes an
    # encoder_decoder's encoder read audio waves as a log-Mel spectrogram of this many channels
    # (25 ms windows, 10 ms hop), two kernel-3 convolutions with GELU (the second of stride 2)
    # and fixed sinusoidal positions; the decoder reads tokens as before. 0: tokens.
    audio_mels: int = 0
    audio_sample_rate: int = 16000  # with audio_mels: the sample rate the front end expects
    scale_tied_logits: bool = False  # tied un-embedding of d_model^-0.5 * x (T5 v1.0)
    sliding_window: int = 0  # >0: each token sees this many keys, itself included (Mistral)
    attention_scale: float = 0.0  # 0 means 1/sqrt(head_dim); T5 uses 1
    dropout: float = 0.0  # on embeddings and every residual branch, in training only
    attention_dropout: float = 0.0  # on attention weights (runs the reference kernel)
    # mha (covers GQA/MQA via n_kv_heads) | mla (DeepSeek-V2) | longformer | bigbird | performer
    # | rfa | linear | lsh | aft_full | aft_local | aft_simple (the efficient families:
    # jaxformer.nn.attention_families, docs/efficient_attention.md)
    attention_type: str = "mha"
    kv_lora_rank: int = 0  # mla: width of the compressed joint key-value latent
    q_lora_rank: int = 0  # mla: width of the compressed query (0: queries uncompressed)
    qk_rope_head_dim: int = 0  # mla: per-head channels of the decoupled RoPE query/key
    qk_nope_head_dim: int = 0  # mla: per-head query/key channels without RoPE
    v_head_dim: int = 0  # mla: per-head value width
    # auto (per backend; blocked on CPU) | reference | blocked | xla | cudnn | flash | splash
    attention: str = "auto"
    # Options of the efficient attention families (docs/efficient_attention.md):
    attention_block: int = 64  # longformer/bigbird block; lsh chunk; linear/performer/rfa chunk
    sparse_window: int = 1  # longformer/bigbird: neighbouring blocks seen on each side
    sparse_global: int = 1  # longformer/bigbird: leading blocks that are global
    sparse_random: int = 2  # bigbird: random key blocks per query block
    random_features: int = 64  # performer/rfa: random features per head
    # performer/rfa: redraw every layer's random features after every k-th optimizer step
    # (a pure function of train.seed, the step and the layer; resumes exactly); 0: never
    feature_redraw: int = 0
    lsh_hashes: int = 2  # lsh: hash rounds
    lsh_buckets: int = 8  # lsh: buckets per round (even)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # float32 | bfloat16; norms, softmax and loss stay float32
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # Layers as one scanned block with stacked weights (compiles once, whatever n_layers);
    # checkpoints then hold blocks with a leading "layers" axis.
    scan_layers: bool = False
    # Rematerialization of each block in the backward pass: none | full | save_dots |
    # save_dots_no_batch (jaxformer.models.layer_stack.REMAT_POLICIES)
    remat: str = "none"
    # Reformer's memory savers (docs/efficient_attention.md): reversible residual blocks,
    # (X1, X2) = (x, x), Y1 = X1 + Attention(norm(X2)), Y2 = X2 + FeedForward(norm(Y1)), output
    # (Y1 + Y2) / 2, whose backward pass recomputes each block's inputs from its outputs instead
    # of storing activations (pre-LN only; no MoE, encoder-decoder or remat)
    reversible: bool = False
    # The dense feed-forward over this many slices of the length, one at a time (>= 1; any
    # length: padded to whole slices), so its [B, T, d_ff] activations never exist whole
    ff_chunks: int = 1
    # Mixture of experts (jaxformer.nn.moe): n_experts > 0 replaces the feed-forward of every
    # moe_every-th block (1: all) by n_experts experts of width moe_d_ff (0: d_ff).
    n_experts: int = 0
    experts_top_k: int = 2  # 1: Switch; 2: Mixtral
    capacity_factor: float = 1.25  # <= 0: dropless
    n_shared_experts: int = 0  # DeepSeekMoE always-on experts
    moe_d_ff: int = 0
    moe_every: int = 1
    moe_group_size: int = 256  # tokens per routing group (capacity is per group)
    router_aux_loss: float = 0.01  # load-balancing loss coefficient (Switch: 0.01)
    router_z_loss: float = 0.001  # router z-loss coefficient (ST-MoE: 0.001)
    # Multi-token prediction (DeepSeek-V3's sequential MTP modules): n > 0 adds n modules,
    # depth k predicting the token k + 1 places ahead (trained with objective.mtp_weight; used
    # by jaxformer.inference.mtp_speculative). Decoder-only, causal objective.
    mtp_heads: int = 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_width(self) -> int:
        return self.d_ff or default_d_ff(self.d_model, self.activation)

    @property
    def image_tokens(self) -> int:
        """The length of an image encoder's rows: its patches, plus the [CLS] token that
        ``pooling='first'`` reads (0 for a token model)."""
        if self.patch_size <= 0:
            return 0
        cls = self.pooling == "first" and self.arch == "encoder"
        return (self.image_size // self.patch_size) ** 2 + cls


GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


def default_d_ff(d_model: int, activation: str) -> int:
    """The hidden width F used when the config leaves it unset.

    Non-gated: 4 * D (Vaswani et al., GPT-2). Gated: 8 * D / 3, rounded up to a multiple of 8.
    A gated block has three D x F matrices instead of two, so F = 8D/3 keeps its parameters and
    FLOPs equal to the 4D plain MLP (3 * 8D/3 = 2 * 4D), as in Shazeer (2020) and Llama. The
    rounding to a multiple of 8 gives matmul shapes that tile onto tensor cores and TPU lanes;
    it is smaller than Llama's multiple of 256, so small test models stay close to 8D/3.
    """
    if activation not in _CHOICES["model.activation"]:
        raise ValueError(f"unknown activation {activation!r}; valid: "
                         f"{', '.join(_CHOICES['model.activation'])}")
    if activation not in GATED_ACTIVATIONS:
        return 4 * d_model
    d_ff = 8 * d_model // 3  # integer floor: int(8 * d / 3) without float rounding
    return -(-d_ff // 8) * 8


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    source: str = "stdlib"  # "stdlib", a file or directory of text/JSONL, or a hub dataset name
    text_field: str = "text"  # JSONL / hub column holding the text
    seq_len: int = 256
    val_fraction: float = 0.05  # share of *documents* held out for validation
    seed: int = 0  # shuffles documents (split, order); independent of the training seed
    cache_dir: str = ""  # "" means $JAXFORMER_CACHE or ~/.cache/jaxformer
    # The kind of tokenizer a new run trains on its documents (jaxformer.data.tokenizer_kinds):
    # bpe (GPT-2 byte-level) | wordpiece (BERT) | unigram (T5's SentencePiece) | char | bytes
    tokenizer: str = "bpe"
    # Image sources (model.patch_size > 0): each training image moved by a random offset of up
    # to this many pixels along each axis (zeros shifted in), a pure function of (seed, step,
    # row); held-out images are never moved. 0: off.
    image_shift: int = 0
    # Audio sources (data.source='speech:<name>', model.audio_mels > 0): the clips' sample rate
    # and the longest clip in seconds (batches are padded with silence to it).
    sample_rate: int = 16000
    clip_seconds: float = 3.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # global batch, in sequences
    steps: int = 1000
    seed: int = 0  # parameter init and batch order
    lr: float = 3e-3
    # cosine | linear | constant | wsd | inverse_sqrt (see jaxformer.train.optimizer);
    # inverse_sqrt: lr is a multiplier of d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)
    schedule: str = "cosine"
    warmup_steps: int = -1  # linear warmup from 0; -1 means 2% of steps (at least 1)
    min_lr_ratio: float = 0.1  # cosine, linear and wsd decay to lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last share of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    # Steps the LR schedule spans (warmup, decay); 0 means train.steps. Set it when extending
    # a run: the old length keeps the old schedule (held at its end value after it), the new
    # length re-plans the decay over the new length (the LR changes at the resumed step).
    schedule_steps: int = 0
    # Start a new run from these weights: a jaxformer run dir (its latest checkpoint) or a
    # Hugging Face save_pretrained directory. Ignored when the run dir already has a checkpoint.
    init_from: str = ""
    # A step whose loss or gradients are not finite changes nothing (parameters and optimizer
    # state stay; the batch is skipped); this many such steps in a row (>= 1) stop the run
    # (exit 3).
    max_bad_steps: int = 5
    # Knowledge distillation (Hinton et al. 2015): a jaxformer run dir whose latest checkpoint
    # is the teacher ("" = off); same tokenizer, any size. Its logits run in the same step,
    # without gradients. loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T ||
    # student_T), softmaxes at temperature T (jaxformer.train.teacher).
    teacher: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What the model learns to predict: a data transform plus the loss options.

    causal (decoder): next token. masked_lm (encoder): BERT masking. prefix_lm (decoder):
    bidirectional prefix, loss on the continuation. span_corruption (encoder_decoder): T5.
    seq2seq (encoder_decoder): input -> target pairs of a task (``data.source`` synthetic:...).
    classification (encoder with model.num_labels): one label per snippet.
    token_classification (encoder with model.token_labels): one label per token.
    permutation_lm (xlnet): XLNet, each token from its predecessors in a sampled order.
    """

    kind: str = "causal"
    mask_rate: float = 0.15  # masked_lm: share of (non-special) tokens selected
    mask_token_prob: float = 0.8  # masked_lm: selected tokens replaced by the mask token
    random_token_prob: float = 0.1  # masked_lm: ... by a random token (the rest unchanged)
    whole_word: bool = False  # masked_lm: select whole words
    prefix_min: float = 0.25  # prefix_lm: the split point is drawn in [min, max] of each doc
    prefix_max: float = 0.75
    partial_k: int = 6  # permutation_lm: predict the last ceil(L / K) tokens of each order
    noise_density: float = 0.15  # span_corruption: share of tokens masked
    mean_span_length: float = 3.0  # span_corruption: mean noise span length
    targets_len: int = 0  # span_corruption decoder length; 0: as T5's random_spans_helper
    label_smoothing: float = 0.0
    z_loss: float = 0.0  # PaLM's auxiliary z_loss * log(Z)^2 per target token
    # causal with model.mtp_heads > 0: loss + mtp_weight * mean over depths of the MTP losses
    mtp_weight: float = 0.3


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-axis rules (see jaxformer.parallel and docs/scaling.md).

    Axis sizes: 0 takes the preset's size, -1 fills the remaining devices (at most one axis).
    preset: data (data parallel) | fsdp (parameters, gradients, optimizer state sharded) |
    fsdp_tensor (FSDP + Megatron-style heads/MLP split on ``tensor``) | sequence (activations
    split along the sequence) | expert (MoE experts split on ``expert``).
    rules: "logical=mesh_axis" entries that replace the preset's rule for that logical axis;
    several mesh axes join with "+" ("batch=data+fsdp"); an empty right side replicates.
    """

    preset: str = "data"
    data: int = 0
    fsdp: int = 0
    tensor: int = 0
    sequence: int = 0
    expert: int = 0
    rules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200
    keep: int = 3
    # Written in the background (orbax async): the steps go on while the files are written.
    async_save: bool = True
    # A save that fails (disk full, unwritable dir): stop (exit 2, earlier checkpoints intact)
    # | retry (warn, train on, try again at the next interval)
    on_error: str = "stop"
    # After SIGTERM/SIGINT: seconds to finish the step and save before giving up (exit 128+n)
    grace_period: float = 60.0


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 200
    batches: int = 8  # 0 means the whole validation split


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Samples printed at the end of training (objectives that generate text)."""

    # Empty: the first line of `count` held-out documents, so prompts fit the corpus.
    prompts: tuple[str, ...] = ()
    count: int = 3  # samples drawn from held-out documents when prompts is empty; 0: none
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (Hu et al. 2021; jaxformer.models.lora, docs/lora.md): the weights of
    ``train.init_from`` stay frozen and only low-rank adapters of the ``targets`` train."""

    rank: int = 0  # r of the adapters A [in, r] and B [r, out]; 0: off (every weight trains)
    alpha: float = 16.0  # the adapters' update A @ B is scaled by alpha / rank
    # Kernels that get adapters: the shorthands q, k, v, o (attention projections), mlp (the
    # dense feed-forward's kernels) and all (q k v o mlp), or regexes searched in parameter
    # paths such as blocks/0/attn/w_q. A target that matches no kernel is an error.
    targets: tuple[str, ...] = ("q", "v")
    # Dropout on each adapter's input (the paper's and PEFT's lora_dropout): > 0 runs the
    # adapters as a branch beside their frozen kernels, x W0 + s * (drop(x) A) B, instead of
    # merging W0 + s A B before the model call (docs/lora.md).
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    sample: SampleConfig = SampleConfig()
    lora: LoraConfig = LoraConfig()


# --- loading -----------------------------------------------------------------------------------


def load_experiment(path: str | Path) -> Config:
    """Imports an experiment file and returns its ``config()``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    module = _import_file(path)
    make = getattr(module, "config", None)
    if not callable(make):
        raise ConfigError(f"{path} defines no config() function returning a jaxformer Config")
    try:
        cfg = make()
    except Exception as e:  # the user's code: report its line, not the framework's stack
        raise ConfigError(_user_code_error(path, e, "config()")) from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, expected Config")
    return validate(cfg)


def _import_file(path: Path) -> types.ModuleType:
    name = f"jaxformer_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import experiment file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        # Also a syntax error in a module the file imports: name the file that has it.
        where = e.filename if e.filename and Path(e.filename).resolve() != path.resolve() else path
        raise ConfigError(f"{where}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # NameError, ImportError... while the file runs
        sys.modules.pop(name, None)
        raise ConfigError(_user_code_error(path, e, "import")) from None
    return module


def _user_code_error(path: Path, error: BaseException, during: str) -> str:
    """One line for an exception raised while running an experiment file: the deepest frame
    of the traceback in that file (``path:line in function()``) and the exception, e.g.
    ``experiments/bad.py:12 in config(): ZeroDivisionError: division by zero``."""
    target = path.resolve()
    frame = None
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == target:
            frame = tb
        tb = tb.tb_next
    message = " ".join(str(error).split())  # one line, whatever the exception's text
    what = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if frame is None:
        return f"{path}: {during} failed: {what}"
    function = frame.tb_frame.f_code.co_name
    where = "module level" if function == "<module>" else f"{function}()"
    return f"{path}:{frame.tb_lineno} in {where}: {what}"


# --- overrides ---------------------------------------------------------------------------------


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``model.d_model``."""
    cfg = Config() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``KEY=VALUE`` strings in order and validates the result."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        cfg = set_key(cfg, key.strip(), raw)
    return validate(cfg)


def set_key(cfg: Config, key: str, raw: str) -> Config:
    valid = all_keys(cfg)
    if key not in valid:
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    return _replace_path(cfg, key.split("."), raw, key)


def _replace_path(obj: Any, parts: list[str], raw: str, key: str) -> Any:
    name = parts[0]
    if len(parts) > 1:
        return dataclasses.replace(obj, **{name: _replace_path(getattr(obj, name), parts[1:],
                                                               raw, key)})
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{name: parse_value(raw, hints[name], key)})


def parse_value(raw: str, typ: Any, key: str) -> Any:
    """Parses ``raw`` to ``typ``; a mismatch is a ConfigError naming key, value and type."""
    def bad() -> ConfigError:
        return ConfigError(f"bad value for {key}: {raw!r} is not a valid {_type_name(typ)}")

    text = raw.strip()
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise bad()
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise bad() from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise bad() from None
    if typ is str:
        return raw
    if typing.get_origin(typ) is tuple:
        (item_type, _) = typing.get_args(typ)
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            raise bad() from None
        if not isinstance(items, list) or not all(isinstance(i, item_type) for i in items):
            raise bad()
        return tuple(items)
    raise bad()


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return f"JSON list of {typing.get_args(typ)[0].__name__}"
    return typ.__name__


# --- validation --------------------------------------------------------------------------------

# Choice-valued keys. ``objective.kind`` joins when jaxformer.objectives registers its
# objectives (register_choices), as do the checks they own (register_check).
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.pos_encoding": ("learned", "sinusoidal", "sinusoidal_2d", "rope", "alibi",
                           "t5_relative", "shaw", "none"),
    "model.arch": ("decoder", "encoder", "encoder_decoder", "image_prefix", "xlnet"),
    "model.attention_type": ("mha", "mla", "longformer", "bigbird", "performer", "rfa",
                             "linear", "lsh", "aft_full", "aft_local", "aft_simple"),
    "model.norm": ("layernorm", "rmsnorm", "scalenorm"),
    "model.norm_position": ("pre", "post"),
    "model.pooling": ("first", "mean"),
    "model.activation": ("relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh"),
    "model.attention": ("auto", "reference", "blocked", "xla", "cudnn", "flash", "splash"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots", "save_dots_no_batch"),
    "mesh.preset": ("data", "fsdp", "fsdp_tensor", "sequence", "expert"),
    "train.schedule": ("cosine", "linear", "constant", "wsd", "inverse_sqrt"),
    "checkpoint.on_error": ("stop", "retry"),
    "data.tokenizer": ("bpe", "wordpiece", "unigram", "char", "bytes"),
}
_POSITIVE = ("model.n_layers", "model.d_model", "model.n_heads", "model.vocab_size",
             "model.max_len", "data.seq_len", "train.batch_size", "train.steps",
             "train.grad_accum", "checkpoint.every", "checkpoint.keep", "log.every", "eval.every",
             "model.moe_every", "model.moe_group_size")


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Checks values that types alone cannot; raises ConfigError with one line."""
    for key in all_keys(cfg):
        typ = typing.get_type_hints(type(get_owner(cfg, key)))[key.split(".")[-1]]
        value = get_key(cfg, key)
        base = typing.get_origin(typ) or typ
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            pass  # an int where a float is declared (lr=1 in an experiment file) is fine
        elif not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise ConfigError(f"bad value for {key}: {value!r} is not a valid {_type_name(typ)}")
        _check_generic(key, typ, value)
    if "objective.kind" not in _CHOICES:
        # The objectives own their names and checks; without them a config would pass
        # half-validated (a causal objective on an encoder-decoder, say).
        raise RuntimeError("import jaxformer.objectives before validating a config: it "
                           "registers the objective.kind choices and the objectives' checks")
    for key, valid in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in valid:
            near = difflib.get_close_matches(str(value), valid, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"bad value for {key}: {value!r}; {hint}choose one of "
                              f"{', '.join(valid)}")
    for key in _POSITIVE:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"bad value for {key}: {get_key(cfg, key)} must be positive")
    m, t = cfg.model, cfg.train
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by "
                          f"model.n_heads={m.n_heads} (or set model.head_dim)")
    if m.n_kv_heads < 0 or m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide "
                          f"model.n_heads={m.n_heads}")
    rotated = int(m.head_size * m.rope_fraction)
    if m.pos_encoding == "rope" and (rotated % 2 or rotated <= 0 or m.rope_fraction > 1):
        raise ConfigError(f"model.rope_fraction={m.rope_fraction} rotates {rotated} of "
                          f"{m.head_size} head channels; it must be an even number > 0")
    for key in ("model.dropout", "model.attention_dropout"):
        if not 0.0 <= get_key(cfg, key) < 1.0:
            raise ConfigError(f"bad value for {key}: {get_key(cfg, key)} must be in [0, 1)")
    for key in ("train.schedule_steps", "sample.count", "model.d_ff", "model.head_dim",
                "model.sliding_window", "model.n_decoder_layers", "model.type_vocab_size",
                "model.num_labels", "model.token_labels", "model.kv_lora_rank",
                "model.q_lora_rank",
                "model.qk_rope_head_dim", "model.qk_nope_head_dim", "model.v_head_dim",
                "model.patch_size", "model.image_size", "model.image_channels",
                "model.vision_layers"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"bad value for {key}: {get_key(cfg, key)} must be >= 0")
    if m.attention_type == "mla" and (
            m.arch != "decoder" or min(m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim,
                                       m.v_head_dim) <= 0 or m.qk_rope_head_dim % 2):
        raise ConfigError(f"model.attention_type='mla' needs model.arch='decoder' (got "
                          f"{m.arch!r}), kv_lora_rank, qk_nope_head_dim and v_head_dim > 0 and "
                          f"an even qk_rope_head_dim > 0 (got {m.kv_lora_rank}, "
                          f"{m.qk_nope_head_dim}, {m.v_head_dim}, {m.qk_rope_head_dim})")
    if m.n_experts < 0 or m.moe_d_ff < 0 or m.n_shared_experts < 0:
        raise ConfigError("model.n_experts, model.moe_d_ff and model.n_shared_experts must be "
                          ">= 0")
    if m.n_experts and not 1 <= m.experts_top_k <= m.n_experts:
        raise ConfigError(f"model.experts_top_k={m.experts_top_k} must be between 1 and "
                          f"model.n_experts={m.n_experts}")
    if m.n_experts and m.scan_layers and m.moe_every != 1:
        raise ConfigError("model.scan_layers=true repeats one block: it needs every block alike "
                          f"(model.moe_every=1), got model.moe_every={m.moe_every}")
    if m.mtp_heads > 0 and (m.arch != "decoder" or cfg.objective.kind != "causal"):
        raise ConfigError(f"model.mtp_heads={m.mtp_heads} (multi-token prediction) needs "
                          f"model.arch='decoder' and objective.kind='causal' (got {m.arch!r} "
                          f"and {cfg.objective.kind!r}); set model.mtp_heads=0")
    if m.two_tower and (m.arch != "encoder" or m.num_labels < 2
                        or cfg.objective.kind != "classification"):
        raise ConfigError(f"model.two_tower=true (pair classification) needs "
                          f"model.arch='encoder', model.num_labels >= 2 and "
                          f"objective.kind='classification' (got {m.arch!r}, {m.num_labels}, "
                          f"{cfg.objective.kind!r})")
    validate_memory_savers(m)
    validate_image_model(cfg)
    validate_audio_model(cfg)
    validate_mesh(cfg.mesh)
    validate_loss_options(cfg)
    validate_attention_family(cfg)
    if cfg.data.seq_len > m.max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={m.max_len}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"bad value for data.val_fraction: {cfg.data.val_fraction} must be in "
                          "[0, 1)")
    if t.warmup_steps != -1 and not 0 <= t.warmup_steps <= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be -1 (2% of steps) or "
                          f"between 0 and train.steps={t.steps}")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"bad value for train.decay_fraction: {t.decay_fraction} must be in "
                          "(0, 1]")
    if t.lr <= 0:
        raise ConfigError(f"bad value for train.lr: {t.lr} must be positive")
    _check_ranges(cfg)
    for check in _CHECKS:
        check(cfg)
    return cfg


INT32_LIMIT = 2**31  # ints reach JAX (seeds, shapes, step counters) as int32


def _check_generic(key: str, typ: Any, value: Any) -> None:
    """What every value of a type must satisfy, whatever its key: floats finite (a nan would
    pass every ``<`` check below), ints within int32, strings without NUL bytes (paths)."""
    if typ is float and not _finite(value):
        raise ConfigError(f"bad value for {key}: {value} must be a finite number")
    if typ is int and not -INT32_LIMIT < value < INT32_LIMIT:
        raise ConfigError(f"bad value for {key}: {value} must be between -2**31 and 2**31 "
                          "(exclusive)")
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, str) and "\x00" in item for item in items):
        raise ConfigError(f"bad value for {key}: {value!r} must not contain a NUL character")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range (from an experiment file)
        return False


# key -> (low, high, low inclusive, high inclusive); None: unbounded on that side. Keys that
# only matter for some settings are checked whatever those settings, so a typo never waits
# for the run that would use it.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "train.grad_clip": (0, None, True, False),
    "train.weight_decay": (0, None, True, False),
    "train.beta1": (0, 1, True, False),
    "train.beta2": (0, 1, True, False),
    "train.min_lr_ratio": (0, 1, True, True),
    "train.max_bad_steps": (1, None, True, False),
    "train.distill_alpha": (0, 1, True, True),
    "train.distill_temperature": (0, None, False, False),
    "train.seed": (0, None, True, False),
    "data.seed": (0, None, True, False),
    "data.image_shift": (0, None, True, False),
    "eval.batches": (0, None, True, False),
    "checkpoint.grace_period": (0, None, False, False),
    "sample.max_new_tokens": (0, None, True, False),
    "sample.temperature": (0, None, True, False),
    "sample.top_k": (0, None, True, False),
    "sample.top_p": (0, 1, False, True),
    "lora.rank": (0, None, True, False),
    "lora.alpha": (0, None, False, False),
    "lora.dropout": (0, 1, True, False),
    "model.init_std": (0, None, True, False),
    "model.norm_eps": (0, None, False, False),
    "model.attention_scale": (0, None, True, False),
    "model.sinusoidal_base": (0, None, False, False),
    "model.rope_theta": (0, None, False, False),
    "model.rope_fraction": (0, 1, False, True),
    "model.relative_buckets": (0, None, False, False),
    "model.relative_max_distance": (0, None, False, False),
    "model.router_aux_loss": (0, None, True, False),
    "model.router_z_loss": (0, None, True, False),
    "model.experts_top_k": (1, None, True, False),
    "model.mtp_heads": (0, None, True, False),
    "model.ff_chunks": (1, None, True, False),
    "model.attention_block": (1, None, True, False),
    "model.sparse_window": (0, None, True, False),
    "model.sparse_global": (0, None, True, False),
    "model.sparse_random": (0, None, True, False),
    "model.random_features": (1, None, True, False),
    "model.feature_redraw": (0, None, True, False),
    "model.lsh_hashes": (1, None, True, False),
    "model.lsh_buckets": (2, None, True, False),
    "objective.mtp_weight": (0, None, True, False),
    "objective.targets_len": (0, None, True, False),
}


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_ranges(cfg: Config) -> None:
    """The ``_RANGES`` bounds, then the ranges that depend on another key."""
    for key, (low, high, low_in, high_in) in _RANGES.items():
        value = get_key(cfg, key)
        ok = ((low is None or (value >= low if low_in else value > low))
              and (high is None or (value <= high if high_in else value < high)))
        if not ok:
            raise ConfigError(f"bad value for {key}: {value} must be "
                              f"{_range_text(low, high, low_in, high_in)}")
    m = cfg.model
    # T5 bucketing: a bidirectional stack splits the buckets in two and gives half of each
    # half to exact offsets; fewer than 4 buckets leave none (a division by zero), and the
    # logarithmic buckets need max_distance beyond the exact ones (log(1) = 0 divides).
    if m.pos_encoding == "t5_relative" and (
            m.relative_buckets < 4 or m.relative_max_distance <= m.relative_buckets // 2):
        raise ConfigError(f"model.pos_encoding='t5_relative' needs model.relative_buckets >= 4 "
                          f"and model.relative_max_distance > relative_buckets // 2 (got "
                          f"{m.relative_buckets} and {m.relative_max_distance})")
    name = cfg.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"bad value for name: {name!r} must be a non-empty file name (it names "
                          "the default run dir runs/<name>) without / or \\")


_BLOCKED_FAMILIES = ("longformer", "bigbird", "lsh")  # the length must be whole blocks


def validate_attention_family(cfg: Config) -> None:
    """An efficient attention family (jaxformer.nn.attention_families) with what it cannot
    run: an attention mask or additive bias, a sliding window, attention dropout, a length
    that is not whole blocks, more global blocks than the sequence has."""
    m = cfg.model
    name = m.attention_type
    if m.feature_redraw > 0 and name not in ("performer", "rfa"):
        raise ConfigError(f"model.feature_redraw={m.feature_redraw} redraws random features: it "
                          f"needs model.attention_type='performer' or 'rfa' (got {name!r}); set "
                          "model.feature_redraw=0")
    if name in ("mha", "mla"):
        return
    where = f"model.attention_type={name!r}"
    if m.arch == "encoder_decoder":
        raise ConfigError(f"{where} runs in decoder-only and encoder models (model.arch="
                          "'decoder' or 'encoder'), not encoder-decoder")
    if m.pos_encoding in ("alibi", "t5_relative", "shaw"):
        raise ConfigError(f"{where} takes no additive attention bias: model.pos_encoding="
                          f"{m.pos_encoding!r} needs one; use learned, sinusoidal, rope or none")
    if cfg.objective.kind == "prefix_lm":
        raise ConfigError(f"{where} cannot apply a prefix-LM mask (objective.kind='prefix_lm'); "
                          "use attention_type='mha'")
    if m.attention_dropout > 0:
        raise ConfigError(f"{where} has no attention weights to drop: set "
                          "model.attention_dropout=0")
    if name == "aft_local" and m.sliding_window <= 0:
        raise ConfigError(f"{where} needs model.sliding_window > 0 (its local window)")
    if name != "aft_local" and m.sliding_window > 0:
        raise ConfigError(f"{where} has its own sparsity: set model.sliding_window=0")
    seq, block = cfg.data.seq_len, m.attention_block
    if name in _BLOCKED_FAMILIES and seq % block:
        raise ConfigError(f"{where}: model.attention_block={block} must divide "
                          f"data.seq_len={seq}")
    if name in ("longformer", "bigbird") and m.sparse_global * block > seq:
        raise ConfigError(f"{where}: model.sparse_global={m.sparse_global} blocks of {block} "
                          f"are more global tokens than data.seq_len={seq} positions")
    if name == "lsh" and (m.lsh_buckets % 2 or m.kv_heads != m.n_heads):
        raise ConfigError(f"{where} needs an even model.lsh_buckets (got {m.lsh_buckets}) and "
                          f"one key head per query head (model.n_kv_heads=0, got "
                          f"{m.n_kv_heads})")


def validate_image_model(cfg: Config) -> None:
    """An image encoder (``model.patch_size > 0``, a ViT) and the 2-D sin-cos positions: an
    encoder classifier of square images cut into whole patches, whose rows (patches, + [CLS])
    are ``data.seq_len`` long and fit ``model.max_len``."""
    m = cfg.model
    if m.pos_encoding == "sinusoidal_2d" and (m.patch_size <= 0 or m.d_model % 4):
        raise ConfigError(f"model.pos_encoding='sinusoidal_2d' encodes the rows and columns of "
                          f"image patches: it needs model.patch_size > 0 and a model.d_model "
                          f"divisible by 4 (got {m.patch_size} and {m.d_model})")
    if m.arch != "image_prefix" and (m.vision_layers or m.freeze_vision):
        key = (f"model.vision_layers={m.vision_layers}" if m.vision_layers
               else "model.freeze_vision=true")
        raise ConfigError(f"{key} shapes an image-prefix decoder's vision tower: it needs "
                          f"model.arch='image_prefix' (got {m.arch!r})")
    if m.arch == "image_prefix" and m.patch_size <= 0:
        raise ConfigError("model.arch='image_prefix' reads images: it needs model.patch_size > 0,"
                          " model.image_size and model.image_channels (docs/vision.md)")
    if m.patch_size <= 0:
        if cfg.data.image_shift > 0:
            raise ConfigError(f"data.image_shift={cfg.data.image_shift} moves training images: "
                              "it needs an image encoder (model.patch_size > 0); set "
                              "data.image_shift=0")
        return
    where = f"model.patch_size={m.patch_size} (an image encoder)"
    if m.arch == "image_prefix":
        validate_image_prefix(cfg)
        return
    if m.arch != "encoder" or m.num_labels < 2 or m.two_tower:
        raise ConfigError(f"{where} classifies images: it needs model.arch='encoder' and "
                          f"model.num_labels >= 2 without two_tower (got {m.arch!r}, "
                          f"{m.num_labels}, two_tower={m.two_tower})")
    if m.image_size <= 0 or m.image_channels <= 0:
        raise ConfigError(f"{where} needs model.image_size > 0 and model.image_channels > 0 "
                          f"(got {m.image_size} and {m.image_channels})")
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size={m.image_size} is not divisible by "
                          f"model.patch_size={m.patch_size}: the patches must tile the image")
    n_patches = (m.image_size // m.patch_size) ** 2
    what = f"{n_patches} patches" + (" + [CLS]" if m.pooling == "first" else "")
    if m.max_len < m.image_tokens:
        raise ConfigError(f"model.max_len={m.max_len} is shorter than an image's "
                          f"{m.image_tokens} tokens ({what} of {m.image_size}x{m.image_size} "
                          f"pixels); set model.max_len >= {m.image_tokens}")
    if cfg.data.image_shift >= m.image_size:
        raise ConfigError(f"data.image_shift={cfg.data.image_shift} would move images of "
                          f"model.image_size={m.image_size} pixels out of view; it must be "
                          "smaller than the image")
    if cfg.data.seq_len != m.image_tokens:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be an image's token count with "
                          f"{where}: set data.seq_len={m.image_tokens} ({what})")


def validate_image_prefix(cfg: Config) -> None:
    """An image-prefix decoder: a vision tower of at least one block, square images of whole
    patches, dense attention (the prefix mask), and the image's patches plus the text
    (``data.seq_len``) within ``model.max_len``."""
    m = cfg.model
    if m.vision_layers <= 0:
        raise ConfigError("model.arch='image_prefix' needs a vision tower: set "
                          "model.vision_layers >= 1")
    if m.image_size <= 0 or m.image_channels <= 0:
        raise ConfigError(f"model.arch='image_prefix' needs model.image_size > 0 and "
                          f"model.image_channels > 0 (got {m.image_size} and "
                          f"{m.image_channels})")
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size={m.image_size} is not divisible by "
                          f"model.patch_size={m.patch_size}: the patches must tile the image")
    if m.d_model % 4:
        raise ConfigError(f"model.arch='image_prefix' gives its vision tower 2-D sin-cos "
                          f"positions: model.d_model must be divisible by 4 (got {m.d_model})")
    if m.attention_type != "mha" or m.mtp_heads or m.num_labels:
        raise ConfigError(f"model.arch='image_prefix' needs model.attention_type='mha' (the "
                          f"prefix mask), no model.mtp_heads and no model.num_labels (got "
                          f"{m.attention_type!r}, {m.mtp_heads}, {m.num_labels})")
    if m.pos_encoding == "sinusoidal_2d":
        raise ConfigError("model.pos_encoding='sinusoidal_2d' is the vision tower's own; the "
                          "image-prefix decoder's positions run along [image; text]: use "
                          "learned, sinusoidal, rope or none")
    if cfg.data.image_shift > 0:
        raise ConfigError("data.image_shift moves classification images; model.arch="
                          "'image_prefix' composes its own: set data.image_shift=0")
    need = m.image_tokens + cfg.data.seq_len
    if need > m.max_len:
        raise ConfigError(f"model.max_len={m.max_len} is shorter than an image's "
                          f"{m.image_tokens} patches + data.seq_len={cfg.data.seq_len} text "
                          f"tokens; set model.max_len >= {need}")


AUDIO_HOP = 160  # samples per spectrogram frame (Whisper's 10 ms at 16 kHz)


def audio_encoder_frames(n_samples: int) -> int:
    """Encoder positions of a clip of ``n_samples``: its N // 160 spectrogram frames, halved
    (rounded up) by the stride-2 convolution."""
    return (n_samples // AUDIO_HOP + 1) // 2


def validate_audio_model(cfg: Config) -> None:
    """An audio encoder (``model.audio_mels > 0``): an encoder-decoder whose front end's sample
    rate is the data's and whose longest clip fits ``model.max_len`` encoder frames."""
    m, d = cfg.model, cfg.data
    for key in ("model.audio_mels", "model.audio_sample_rate", "data.sample_rate"):
        if get_key(cfg, key) < (0 if key == "model.audio_mels" else 1):
            raise ConfigError(f"bad value for {key}: {get_key(cfg, key)} must be "
                              f"{'>= 0' if key == 'model.audio_mels' else 'positive'}")
    if not _finite(d.clip_seconds) or d.clip_seconds <= 0:
        raise ConfigError(f"bad value for data.clip_seconds: {d.clip_seconds} must be positive")
    if m.audio_mels <= 0:
        return
    where = f"model.audio_mels={m.audio_mels} (an audio encoder)"
    if m.arch != "encoder_decoder" or m.patch_size > 0:
        raise ConfigError(f"{where} transcribes speech: it needs model.arch='encoder_decoder' "
                          f"without model.patch_size (got {m.arch!r}, {m.patch_size})")
    if cfg.objective.kind != "transcription":
        raise ConfigError(f"{where} is trained by objective.kind='transcription' (got "
                          f"{cfg.objective.kind!r})")
    if d.sample_rate != m.audio_sample_rate:
        raise ConfigError(f"data.sample_rate={d.sample_rate} Hz: the audio front end is "
                          f"configured for model.audio_sample_rate={m.audio_sample_rate} Hz; "
                          "resample the data or set both to the same rate")
    samples = int(round(d.clip_seconds * d.sample_rate))
    frames = audio_encoder_frames(samples)
    if frames > m.max_len:
        raise ConfigError(f"data.clip_seconds={d.clip_seconds} is {frames} encoder frames "
                          f"({samples // AUDIO_HOP} spectrogram frames, stride 2), more than "
                          f"model.max_len={m.max_len}; set model.max_len >= {frames}")


def validate_memory_savers(m: ModelConfig) -> None:
    """Reversible blocks and the chunked feed-forward with what they cannot take."""
    if m.ff_chunks > 1 and m.n_experts > 0:
        raise ConfigError(f"model.ff_chunks={m.ff_chunks} chunks the dense feed-forward; "
                          "mixture-of-experts layers route whole groups of tokens: set "
                          "model.ff_chunks=1 with model.n_experts > 0")
    if not m.reversible:
        return
    refused = [
        (m.norm_position != "pre", f"pre-LN blocks (model.norm_position='pre', got "
                                   f"{m.norm_position!r})"),
        (m.arch == "encoder_decoder", "self-attention stacks (model.arch='decoder' or "
                                      "'encoder'; cross-attention is not reversible)"),
        (m.n_experts > 0, f"dense feed-forwards (model.n_experts=0, got {m.n_experts})"),
        (m.remat != "none", f"no remat (model.remat='none', got {m.remat!r}: reversible "
                            "blocks already recompute their activations)"),
    ]
    for bad, needs in refused:
        if bad:
            raise ConfigError(f"model.reversible=true needs {needs}")


def validate_mesh(mesh: MeshConfig) -> None:
    """Axis sizes and rule syntax (whether the sizes fit the devices is checked at start-up)."""
    sizes = {a: getattr(mesh, a) for a in ("data", "fsdp", "tensor", "sequence", "expert")}
    for axis, size in sizes.items():
        if size < -1:
            raise ConfigError(f"bad value for mesh.{axis}: {size}; use a size >= 1, 0 (the "
                              "preset's) or -1 (the remaining devices)")
    if sum(size == -1 for size in sizes.values()) > 1:
        raise ConfigError("at most one mesh axis may be -1 (fill the remaining devices); got "
                          + ", ".join(f"mesh.{a}=-1" for a, s in sizes.items() if s == -1))
    for rule in mesh.rules:
        name, sep, axes = rule.partition("=")
        unknown = [a for a in axes.split("+") if a and a not in sizes]
        if not sep or not name.strip() or unknown:
            raise ConfigError(f"bad mesh rule {rule!r}: expected logical=mesh_axis[+mesh_axis] "
                              f"with mesh axes among {', '.join(sizes)}")


def validate_loss_options(cfg: Config) -> None:
    """The loss options every objective shares (one-line ConfigError)."""
    o = cfg.objective
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ConfigError(f"bad value for objective.label_smoothing: {o.label_smoothing} must "
                          "be in [0, 1)")
    if o.z_loss < 0.0:
        raise ConfigError(f"bad value for objective.z_loss: {o.z_loss} must be >= 0")


_CHECKS: list[typing.Callable[[Config], None]] = []


def register_choices(key: str, choices: tuple[str, ...]) -> None:
    """Makes ``choices`` the valid values of ``key`` (a layer above owns the list)."""
    _CHOICES[key] = tuple(choices)


def register_check(check: typing.Callable[[Config], None]) -> None:
    """Adds a check that ``validate`` runs last (e.g. the objectives' own options)."""
    if check not in _CHECKS:
        _CHECKS.append(check)


def choices(key: str) -> tuple[str, ...]:
    """The valid values of a choice-valued key (e.g. ``model.pos_encoding``)."""
    return _CHOICES[key]


def choice_keys() -> list[str]:
    return list(_CHOICES)


def get_owner(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


# --- serialization -----------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config saved with ``to_json`` (tuples come back from JSON lists)."""
    def build(cls: Any, values: dict[str, Any], where: str = "the config") -> Any:
        if not isinstance(values, dict):
            raise ConfigError(f"{where} is a JSON {type(values).__name__}, expected an object")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                value = build(typ, value, f"section {f.name!r}")
            elif typing.get_origin(typ) is tuple:
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"bad value for {f.name}: {value!r} is not a "
                                      f"{_type_name(typ)}")
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    return validate(build(Config, data))


def diff(old: Config, new: Config) -> list[str]:
    """Keys whose values differ, as ``key: old -> new`` lines."""
    return [f"{k}: {get_key(old, k)!r} -> {get_key(new, k)!r}" for k in all_keys(old)
            if get_key(old, k) != get_key(new, k)]
