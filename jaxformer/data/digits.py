"""scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``; Alpaydin and
Kaynak 1998): 1,797 grey images of 8x8 pixels with grey levels 0..16, labels 0..9, read from
the scikit-learn package (no download). One fixed split for every task that reads them
(``lra:image``, ``image:digits``): the images whose index is 0 mod 5 are held out (360).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxformer.data.errors import DataError

SIDE = 8
LEVELS = 16  # grey levels run 0..LEVELS
HELDOUT_EVERY = 5


@functools.cache
def load_digits(source: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (grey levels [1797, 8, 8] int32 in 0..16, labels [1797] int32). ``source``: the
    data.source that needs them, named in the error when scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # lazily: few runs need it
    except ImportError:
        raise DataError(f"data.source={source!r} needs scikit-learn (pip install "
                        "scikit-learn): its bundled digits are the images") from None
    digits = sklearn_digits()
    return digits.images.astype(np.int32), digits.target.astype(np.int32)


def heldout_mask(n: int) -> np.ndarray:
    """[n] bool: which of n images are held out (index 0 mod 5)."""
    return np.arange(n) % HELDOUT_EVERY == 0
