"""The splash kernel on a mesh: a Pallas kernel cannot be partitioned by XLA, so under an
activation-sharding context it runs per device under shard_map (rows as the batch, heads as
the activations' heads). On 4 fake CPU devices in the Pallas interpreter it must give the
reference attention's numbers, for query heads that split like the key/value heads and for
ones that do not."""

from __future__ import annotations

import pytest

from tests.parallel.fake_devices import run_with_devices

SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np
from jaxformer.config import MeshConfig
from jaxformer.nn.attention_kernels import reference_attention, splash_attention
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import activation_sharding, rules_for

mesh = make_mesh(MeshConfig(preset="fsdp_tensor", tensor={tensor}))
rules = rules_for(MeshConfig(preset="fsdp_tensor"))
b, t, n, kv, h = 4, 128, 4, {kv}, 32
q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, h))
           for i, heads in enumerate((n, kv, kv)))
seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 28], b, axis=0), jnp.int32)
want = reference_attention(q, k, v, is_causal=True, segment_ids=seg)
with activation_sharding(mesh, rules):
    got = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, is_causal=True, segment_ids=s,
                                                      interpret=True))(q, k, v, seg)
    text = jax.jit(lambda q, k, v: splash_attention(q, k, v, is_causal=True, interpret=True)
                   ).lower(q, k, v).as_text()
print(json.dumps({{"err": float(jnp.abs(got - want).max()), "mesh": dict(mesh.shape),
                  "shard_map": "manual_computation" in text or "shard_map" in text}}))
"""


@pytest.mark.parametrize("tensor,kv", [(2, 2), (2, 1)], ids=["heads-split", "mqa-whole"])
def test_splash_on_a_mesh_matches_the_reference(tensor, kv):
    result = run_with_devices(SCRIPT.format(tensor=tensor, kv=kv), n_devices=4, timeout=600)
    assert result["mesh"]["fsdp"] == 2 and result["mesh"]["tensor"] == tensor
    assert result["shard_map"]
    assert result["err"] < 1e-5
