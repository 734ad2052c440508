"""A LoRA run dir (``lora.rank > 0``): its checkpoints hold the adapters only, and
``lora_base.json`` names the frozen base they adapt (``train.init_from``, resolved, and the
step of the base's checkpoint the run started from).

``load_run`` gives every reader (sampling, evaluation, export, ``train.init_from``, analysis)
the merged weights through ``merged_params``: the base's weights (read with ``load_run`` too,
so a base that is itself a LoRA run is merged first) plus the adapters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models import lora
from jaxformer.models.build import init_params
from jaxformer.models.layer_stack import stack_params

BASE_FILE = "lora_base.json"


def base_record(run_dir: Path) -> dict[str, Any] | None:
    """{"init_from": path or "", "step": int or None} of a LoRA run dir; None when absent."""
    path = Path(run_dir) / BASE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable ({e})") from None
    if not isinstance(record, dict) or "init_from" not in record:
        raise UserError(f"{path} does not name a LoRA base (no init_from)")
    return record


def write_base_record(run_dir: Path, init_from: str, step: int | None) -> None:
    path = Path(run_dir) / BASE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"init_from": init_from, "step": step}, indent=1) + "\n")
    tmp.replace(path)


def merged_params(cfg: Config, run_dir: Path, adapters: Any,
                  load_run: Callable[[Path, int | None], tuple[Config, Any]]) -> Any:
    """The weights of LoRA run ``run_dir`` (config ``cfg``): its base's (read with
    ``load_run``, ``runs.restore.load_run``), in the run's layout, with ``adapters`` folded in
    (``models.lora.merge``). A base without ``init_from`` was the seeded random init, which is
    drawn again."""
    record = base_record(run_dir) or {"init_from": cfg.train.init_from, "step": None}
    source = record["init_from"]
    if not source:
        base = init_params(cfg.model, cfg.train.seed)
    else:
        if not Path(source).is_dir():
            raise UserError(f"{run_dir} is a LoRA run whose base {source} is gone; its "
                            "checkpoints hold only the adapters")
        try:
            _, base = load_run(Path(source), record.get("step"))
        except UserError as e:
            raise UserError(f"the base of LoRA run {run_dir}: {e}") from None
        if cfg.model.scan_layers:
            base = stack_params(base)
    return lora.merge(base, adapters, lora.scale(cfg.lora))
