from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxformer.nn.positional import sinusoidal_encoding


def test_sinusoidal_matches_the_paper_formula():
    d, base = 16, 10000.0
    pos = np.arange(50)
    got = np.asarray(sinusoidal_encoding(jnp.asarray(pos)[None], d, base))[0]
    want = np.zeros((50, d))
    for t in pos:
        for i in range(d // 2):
            want[t, 2 * i] = np.sin(t / base ** (2 * i / d))
            want[t, 2 * i + 1] = np.cos(t / base ** (2 * i / d))
    np.testing.assert_allclose(got, want, atol=1e-5)
