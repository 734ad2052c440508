"""Attention over an image: where a Vision Transformer's [CLS] query looks, per head, drawn over
the input image (``jaxformer attention RUN_DIR --image I`` on an image run; docs/vision.md).

Letters: N heads, T tokens ([CLS] + the patches), G patches per side, H/W image side, C
channels.

For one held-out image of the run's data source, one deterministic forward pass captures every
layer's attention probabilities [N, T, T] (``attention_maps.collect_attention``, the reference
kernel). Of each selected layer (default: the last, whose [CLS] state the classifier reads) the
figure draws the row of the [CLS] query: its weights on the G*G patches, reshaped to the patch
grid (patch n at row n // G, column n % G, as ``models.vision.patchify``), upsampled to the
image (each weight covering its P x P pixels) and laid over the image, one panel per head after
a panel with the image alone; each head's title gives the weight [CLS] keeps on itself, so
that the weights drawn plus that one sum to 1. With ``model.pooling='mean'`` (no [CLS]) the
drawn row is the mean over all queries, the attention each patch receives on average.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.analysis.attention_maps import (
    DPI,
    collect_attention,
    enable_attention_capture,
    select_layers,
)
from jaxformer.analysis.plots import _pyplot
from jaxformer.config import Config
from jaxformer.data import images
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.runs import rundir
from jaxformer.runs.restore import load_run

PANEL = 240  # pixels per panel side
COLUMNS = 5  # panels per row
OVERLAY_ALPHA = 0.6


@dataclasses.dataclass
class ImageAttention:
    """One layer's [CLS] attention over one image: the arrays the figure draws."""

    layer: int
    patch_probs: np.ndarray  # [N, G, G] float32: [CLS]'s weight on each patch
    cls_probs: np.ndarray  # [N] float32: the weight it keeps on itself (0 without [CLS])
    upsampled: np.ndarray  # [N, H, W] float32: patch_probs, each over its P x P pixels


def cls_attention(probs: np.ndarray, grid: int, has_cls: bool, patch: int,
                  layer: int) -> ImageAttention:
    """A layer's probabilities [N, T, T] -> the [CLS] row split into itself and the patch grid
    (``has_cls`` False: the mean row over all queries, T = G * G)."""
    probs = np.asarray(probs, np.float32)
    row = probs[:, 0] if has_cls else probs.mean(axis=1)  # [N, T]
    cls = row[:, 0] if has_cls else np.zeros(row.shape[0], np.float32)
    grid_probs = row[:, int(has_cls):].reshape(-1, grid, grid)
    up = np.kron(grid_probs, np.ones((1, patch, patch), np.float32))
    return ImageAttention(layer, grid_probs, cls, up)


def image_attention(cfg: Config, params: dict, pixels: np.ndarray
                    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One image [H, W, C] through the image encoder of ``cfg`` with ``params`` (reference
    kernel, no dropout) -> (class logits [L], {layer: probabilities [N, T, T]})."""
    model_cfg = dataclasses.replace(cfg.model, attention="reference", attention_dropout=0.0,
                                    dropout=0.0)
    graphdef, _ = abstract_model(model_cfg)

    def forward(params, x):
        model = nnx.merge(graphdef, params)
        enable_attention_capture(model)
        return collect_attention(model, lambda m: m.classify_image(x[None]))

    logits, weights = jax.jit(forward)(params, jnp.asarray(pixels, jnp.float32))
    by_layer = {}
    for path, w in weights.items():
        layer = next(int(p) for p in path if isinstance(p, int) or str(p).isdigit())
        by_layer[layer] = np.asarray(w[0], np.float32)
    return np.asarray(logits[0]), by_layer


def figure_pixels(n_heads: int) -> tuple[int, int]:
    """The PNG size (width, height) of one layer's figure: the image and one panel per head,
    up to COLUMNS panels a row, PANEL px each, plus 100 px for the colour bar and 60 for the
    title."""
    panels = n_heads + 1
    cols, rows = min(panels, COLUMNS), math.ceil(panels / COLUMNS)
    return cols * PANEL + 100, rows * PANEL + 60


def _display(pixels: np.ndarray) -> tuple[np.ndarray, str | None]:
    """[H, W, C] -> an array imshow draws (grey or RGB scaled to [0, 1]) and its colour map."""
    lo, hi = float(pixels.min()), float(pixels.max())
    x = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return (x[..., 0], "gray") if x.shape[-1] == 1 else (x[..., :3], None)


def plot_image_attention(att: ImageAttention, pixels: np.ndarray, out: Path,
                         title: str) -> None:
    """One PNG: the image, then per head the image with ``att.upsampled`` over it (a shared
    colour scale from 0 to the layer's largest patch weight); size ``figure_pixels``."""
    plt = _pyplot()
    n = att.patch_probs.shape[0]
    width, height = figure_pixels(n)
    cols, rows = min(n + 1, COLUMNS), math.ceil((n + 1) / COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI,
                             squeeze=False, layout="constrained")
    shown, cmap = _display(pixels)
    vmax = float(att.upsampled.max()) or 1.0
    overlay = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i > n:
            ax.axis("off")
            continue
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        if i == 0:
            ax.set_title("input", fontsize=10)
            continue
        h = i - 1
        overlay = ax.imshow(att.upsampled[h], cmap="inferno", vmin=0.0, vmax=vmax,
                            alpha=OVERLAY_ALPHA, interpolation="nearest")
        ax.set_title(f"head {h} ([CLS] itself {att.cls_probs[h]:.2f})", fontsize=9)
    fig.colorbar(overlay, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the size stays figure_pixels
    plt.close(fig)


def write_image_attention(run_dir: Path, out: Path, *, index: int = 0, step: int | None = None,
                          layers: Sequence[int] | None = None) -> list[Path]:
    """Loads an image run (config, latest checkpoint or ``step``), runs held-out image
    ``index`` of its data source through it and writes ``out/image{index}_layer{i}.png`` per
    selected layer (default: the last) and ``out/attention.npz``: per layer ``layer{i}``
    [N, G, G] (the patch weights drawn), ``layer{i}_cls`` [N] and ``layer{i}_full`` [N, T, T]
    (all probabilities), plus ``pixels`` [H, W, C], ``label``, ``logits`` [L]. -> the paths
    written, PNGs first."""
    run_dir, out = Path(run_dir), Path(out)
    saved = rundir.read_config(run_dir)
    if saved is None:
        raise UserError(f"{run_dir} is not a jaxformer run dir (no {rundir.CONFIG_FILE})")
    m = saved.model
    if m.attention_type not in ("mha", "mla"):
        raise UserError(f"{run_dir} uses model.attention_type={m.attention_type!r}, which "
                        "forms no softmax attention map to draw")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    # A DataError (a UserError) when the source's images do not fit the model.
    source = images.create(saved.data.source, m.image_size, m.image_channels, m.num_labels)
    n_held = len(source.heldout_labels)
    if not 0 <= index < n_held:
        raise UserError(f"--image {index} is out of range: {saved.data.source} holds "
                        f"{n_held} held-out images (0..{n_held - 1})")
    pixels, label = source.heldout_images[index], int(source.heldout_labels[index])
    cfg, params = load_run(run_dir, step)
    logits, probs = image_attention(cfg, params, pixels)
    grid = m.image_size // m.patch_size
    wanted = list(layers) if layers else [-1]
    maps = [cls_attention(probs[i], grid, m.pooling == "first", m.patch_size, i)
            for i in select_layers(len(probs), wanted)]
    step_used = step if step is not None else rundir.latest_checkpoint_step(run_dir)
    head = (f"{run_dir.name}" + ("" if step_used is None else f" step {step_used}")
            + f": held-out image {index} (label {label}, predicted {int(np.argmax(logits))})")
    query = "[CLS]" if m.pooling == "first" else "mean query"
    written = []
    for att in maps:
        path = out / f"image{index}_layer{att.layer}.png"
        plot_image_attention(att, pixels, path, f"{head}\n{query} attention, layer {att.layer}")
        written.append(path)
    arrays: dict[str, np.ndarray] = {"pixels": pixels, "label": np.asarray(label),
                                     "logits": logits}
    for att in maps:
        arrays.update({f"layer{att.layer}": att.patch_probs,
                       f"layer{att.layer}_cls": att.cls_probs,
                       f"layer{att.layer}_full": probs[att.layer]})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "attention.npz", **arrays)
    return [*written, out / "attention.npz"]
