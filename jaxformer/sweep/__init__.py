"""Hyperparameter sweeps: define points next to an experiment's ``config()``, run them locally
(or emit SLURM / TPU scripts), and compare the runs in one table.

An experiment file gains ``def sweep() -> list[dict[str, object]]``, built with the helpers of
``jaxformer.sweep.space``::

    from jaxformer.sweep.space import grid, seeds, product

    def sweep():
        return product(grid(**{"train.lr": [1e-3, 3e-3]}), seeds(0, 1))
"""

from jaxformer.sweep.space import (
    choice,
    grid,
    log_uniform,
    product,
    random_search,
    seeds,
    uniform,
)

__all__ = ["choice", "grid", "log_uniform", "product", "random_search", "seeds", "uniform"]
