"""What TensorBoard shows of the text a run logs (samples): read back with TensorBoard's own
event reader and rendered with its TEXT plugin's own Markdown-to-HTML function."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.text.text_plugin import text_array_to_html
from tensorboard.util import tensor_util

from jaxformer.train.reporting import Reporter

# What finish() logs: prompts and completions of Python-like text, with what Markdown would
# otherwise eat: indentation, blank lines, "#" (a heading), "*" and "_" (emphasis), "<" (HTML),
# a tab, and backticks.
SAMPLES = ("--- prompt 'def '\n"
           "def total_0(alpha, beta):\n"
           "    # add them\n"
           "    if alpha:\n"
           "        return alpha * beta_2 * 3  # <b>not bold</b>\n"
           "\n"
           "\n"
           "--- prompt 'class '\n"
           "class Item:\n"
           "\tx = `1`  ```not a fence```\n"
           "    _y_ = [i for i in range(3)]")


def logged_text(run_dir) -> str:
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    (event,) = acc.Tensors("samples/text_summary")
    return tensor_util.make_ndarray(event.tensor_proto).item().decode()


def test_samples_render_verbatim_in_tensorboards_text_tab(tmp_path):
    reporter = Reporter(tmp_path, echo=lambda s: None)
    reporter.text(7, "samples", SAMPLES)
    reporter.close()
    rendered = text_array_to_html(np.array(logged_text(tmp_path).encode()), enable_markdown=True)
    blocks = re.findall(r"<pre><code>(.*?)</code></pre>", rendered, re.DOTALL)
    assert len(blocks) == 1 and rendered.strip().startswith("<pre><code>"), rendered
    # Every line as typed (Markdown turns a tab into spaces up to the next 4-column stop).
    assert html.unescape(blocks[0]) == SAMPLES.expandtabs(4) + "\n"


def test_training_does_not_import_torch_but_torch_still_imports_after():
    """tensorboardX would import PyTorch (2-3 s per training process) only to accept torch
    tensors; the trainer hides it during that import and leaves ``import torch`` working."""
    code = ("import sys, jaxformer.train.loop, jaxformer.sweep.hparams\n"
            "print('torch' in sys.modules)\n"
            "import torch\n"
            "print(torch.tensor([1.0]).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.split() == ["False", "1.0"], out.stdout
