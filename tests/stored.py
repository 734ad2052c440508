"""What a checkpoint step stores, read from orbax's own metadata.

File sizes on disk are not a stable measure: OCDBT may write the same arrays into more or fewer
data files from one run to the next (a LoRA checkpoint of 0.13x the base's scalars once measured
0.50x its bytes on CI). Shapes and dtypes are exact.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def stored_bytes(item_dir: Path) -> int:
    """Bytes of the arrays in one saved item (e.g. ``checkpoints/40/state``), shape x dtype."""
    meta = ocp.PyTreeCheckpointer().metadata(item_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
