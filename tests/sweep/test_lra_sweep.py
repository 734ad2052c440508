"""experiments/lra_sweep.py: the 50 points of the family x task comparison resolve to valid
configs (every override passes the config-time checks a run makes), as `jaxformer sweep` loads
them."""

from __future__ import annotations

from pathlib import Path

from jaxformer.nn.attention_families import FAMILIES
from jaxformer.sweep.space import load_sweep

SWEEP = Path(__file__).resolve().parents[2] / "experiments/lra_sweep.py"


def test_every_family_meets_every_task_once():
    sweep = load_sweep(SWEEP)
    points = {(p.cfg.data.source, p.cfg.model.attention_type): p.cfg for p in sweep.points}
    tasks = ("lra:listops", "lra:text", "lra:retrieval", "lra:image", "lra:pathfinder")
    assert len(sweep.points) == len(points) == 50
    assert set(points) == {(t, a) for t in tasks for a in ("mha", *FAMILIES)}
    assert len({p.name for p in sweep.points}) == 50  # one run dir each
    for (source, attention), cfg in points.items():
        assert cfg.data.seq_len % cfg.model.attention_block == 0
        assert cfg.model.two_tower == (source == "lra:retrieval")
        assert cfg.model.sliding_window == (128 if attention == "aft_local" else 0)
        # every held-out pair and image is scored; Pathfinder's generated set: 512 images
        want = {"lra:retrieval": 0, "lra:image": 0, "lra:pathfinder": 64}.get(source, 8)
        assert cfg.eval.batches == want, (source, cfg.eval.batches)
