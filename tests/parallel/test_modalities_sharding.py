"""Image, audio and caption batches shard over the mesh as text batches do
(tests/train/test_sharding.py): on 8 fake CPU devices a tiny ViT (``image:digits``,
classification), a tiny Whisper-style recognizer (``speech:dtmf``, transcription) and a tiny
image-prefix captioner (``caption:digits``) train on the batches their objective's task builds
with the losses of 1 device under the FSDP mesh (which splits the batch rows over its devices,
as the data-parallel mesh does, and the weights too); every batch array's rows are split one per
device; and a mesh that splits the sequence axis (which pixel and audio
batches do not have) is a one-line error before anything compiles."""

from __future__ import annotations

from tests.parallel.fake_devices import run_with_devices

# One process for both modalities and every mesh (JAX's start-up is paid once); the two
# modalities run in two threads, as XLA compiles on one core and CI has two.
SCRIPT = r"""
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
import jax
from jaxformer import config as config_lib
from jaxformer.config import Config, DataConfig, MeshConfig, ObjectiveConfig, TrainConfig
from jaxformer.errors import UserError
from jaxformer.models import presets
from jaxformer.train.runtime import build_runtime
from tests.train.helpers import task_batches

assert jax.device_count() == 8, jax.device_count()
# FSDP alone: the data-parallel mesh splits the rows the same way and adds nothing to check
# here (text batches are tested under every preset in tests/parallel/test_presets.py).
MESHES = ("fsdp",)
TRAIN = TrainConfig(batch_size=8, steps=3, lr=1e-2, warmup_steps=0)  # step 1 updates already
CONFIGS = {
    # 8x8 grey digits in 2x2 patches: 16 patches + [CLS]; pixels [8, 8, 8, 1], targets [8, 1]
    "image": Config(
        model=presets.vit(n_layers=1, d_model=32, n_heads=4, d_ff=64, patch_size=2,
                          image_size=8, image_channels=1, num_labels=10, max_len=17,
                          init_std=0.1),
        data=DataConfig(source="image:digits", seq_len=17),
        objective=ObjectiveConfig(kind="classification"), train=TRAIN),
    # DTMF clips of up to 3 s (the shortest clip_seconds that holds 7 keys at the slowest is
    # 2.65 s): audio [8, 48000], audio_mask [8, 300], 150 encoder frames; 7 keys + EOS = 8
    # decoder tokens
    "audio": Config(
        model=presets.whisper(n_layers=1, n_decoder_layers=1, d_model=32, n_heads=4, d_ff=64,
                              vocab_size=40, audio_mels=16, max_len=150),
        data=DataConfig(source="speech:dtmf", seq_len=8, sample_rate=16000, clip_seconds=3.0),
        objective=ObjectiveConfig(kind="transcription"), train=TRAIN),
    # 24x24 images of digits, 4x4 patches (36) as the prefix of 6 caption tokens: pixels
    # [8, 24, 24, 1] + the decoder rows [8, 6]
    "caption": Config(
        model=presets.image_prefix(n_layers=1, vision_layers=1, d_model=32, n_heads=4,
                                   d_ff=64, patch_size=4, image_size=24, image_channels=1,
                                   vocab_size=16, max_len=42, init_std=0.1),
        data=DataConfig(source="caption:digits", seq_len=6),
        objective=ObjectiveConfig(kind="captioning"), train=TRAIN),
}


def train(cfg, host, devices):
    # 3 steps on one fixed batch, placed as the trainer places its batches (Runtime.put_batch):
    # the loss must fall, so the steps provably update the parameters.
    rt = build_runtime(cfg, devices)
    state, losses = rt.init_state(), []
    for _ in range(cfg.train.steps):
        batch = rt.put_batch(host)
        state, metrics = rt.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    rows = {k: sorted({s.data.shape[0] for s in v.addressable_shards}) for k, v in batch.items()}
    devices = {k: len({s.device for s in v.addressable_shards}) for k, v in batch.items()}
    return losses, rows, devices


def modality(name):
    start = time.perf_counter()
    cfg = config_lib.apply_overrides(CONFIGS[name], [])  # validated as an experiment's is
    host = task_batches(cfg)(0)  # the objective's task: what train() reads at step 0
    res = {"shapes": {k: list(v.shape) for k, v in host.items()}}
    res["one"] = train(cfg, host, jax.devices()[:1])[0]
    for preset in MESHES:
        res[preset], res[preset + "_rows"], res[preset + "_devices"] = train(
            dataclasses.replace(cfg, mesh=MeshConfig(preset=preset)), host, jax.devices())
    try:
        build_runtime(dataclasses.replace(cfg, mesh=MeshConfig(preset="sequence")),
                      jax.devices())
        res["sequence_error"] = None
    except UserError as e:
        res["sequence_error"] = str(e)
    res["seconds"] = round(time.perf_counter() - start, 1)
    return res


with ThreadPoolExecutor(3) as pool:
    out = dict(zip(CONFIGS, pool.map(modality, CONFIGS)))
print(json.dumps(out))
"""

TOLERANCE = 1e-6  # relative, per step's loss (seen: at most 2e-7)


def test_image_audio_and_caption_batches_shard_like_text_batches():
    result = run_with_devices(SCRIPT, 8, timeout=600)
    for name, modality_key, words in (("image", "pixels", "image batches"),
                                      ("audio", "audio", "audio batches"),
                                      ("caption", "pixels", "image batches")):
        res = result[name]
        assert modality_key in res["shapes"] and res["shapes"][modality_key][0] == 8
        one = res["one"]
        assert one[-1] < one[0], (name, one)  # the steps update the parameters
        for preset in ("fsdp",):
            worst = max(abs(a - b) / abs(a) for a, b in zip(one, res[preset], strict=True))
            print(f"{name} {preset}: 1 device {one}, 8 devices {res[preset]}, "
                  f"max relative difference {worst:.1e}")
            assert worst <= TOLERANCE, (name, preset, one, res[preset])
            # every array of the batch (pixels or audio and its mask, targets, weights, ...):
            # 8 rows, one per device
            assert set(res[preset + "_rows"]) == set(res["shapes"]), res[preset + "_rows"]
            assert all(rows == [1] for rows in res[preset + "_rows"].values()), (name, res)
            assert all(n == 8 for n in res[preset + "_devices"].values()), (name, res)
        error = res["sequence_error"]
        assert error is not None and "\n" not in error, (name, error)
        assert "splits the sequence axis" in error and words in error, (name, error)
