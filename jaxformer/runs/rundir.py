"""Run directories: the saved config, the tokenizer, and refusing conflicting reuse.

Layout of ``runs/<name>/``: ``config.json`` (resolved config), ``tokenizer.json``,
``data.json`` (what the data source held: files, sizes, content hashes), ``checkpoints/<step>/``
(orbax), TensorBoard event files, ``samples.txt``, ``.lock`` (who trains in it now). A run
converted from a Hugging Face model, or fine-tuned from one, also has ``special_tokens.json``
(its special-token ids, ``jaxformer.runs.specials``) and the tokenizer's own files
(``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxformer import config as config_lib
from jaxformer import objectives  # noqa: F401 - registers objective.kind and its checks
from jaxformer.config import Config
from jaxformer.data.manifest import describe_change
from jaxformer.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
DATA_FILE = "data.json"

# Keys that may change between invocations on one run dir without changing what is trained
# (the mesh too: a checkpoint restores onto any mesh, and the batch is a function of the step).
FREE_KEYS = ("log.", "eval.", "checkpoint.", "sample.", "data.cache_dir", "mesh.")


def read_config(run_dir: Path) -> Config | None:
    """The config saved in ``run_dir``, or None if there is none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return config_lib.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, UserError) as e:  # JSON and Unicode decode errors
        raise UserError(f"{path} is not a readable jaxformer config: {e}") from e


def check_compatible(saved: Config, new: Config, run_dir: Path, allow_change: bool) -> None:
    """Refuses to continue a run whose training-relevant config changed."""
    changed = [line for line in config_lib.diff(saved, new) if not line.startswith(FREE_KEYS)]
    if changed and not allow_change:
        raise UserError(
            f"{run_dir} holds a run with a different config ({'; '.join(changed)}); use another "
            "--run-dir, or pass --allow-config-change to continue it with the new config")


def write_config(run_dir: Path, cfg: Config) -> None:
    _write_atomic(Path(run_dir) / CONFIG_FILE, config_lib.to_json(cfg) + "\n")


def check_data(run_dir: Path, manifest: dict, allow_change: bool) -> str | None:
    """Refuses to resume on data that changed since the run began (a file added, changed or
    removed would silently change every later batch); -> a note when allowed anyway."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        return None  # a run from before data.json was written: nothing to compare with
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable ({e}); move it away to resume without the "
                        "data check") from e
    change = describe_change(saved, manifest)
    if change is None:
        return None
    if not allow_change:
        raise UserError(f"{change}; resuming would train on different batches than the run "
                        "began with. Restore the data, or pass --allow-data-change to go on "
                        "with the new data")
    return f"warning: {change}; going on with the new data (--allow-data-change)"


def write_data_manifest(run_dir: Path, manifest: dict) -> None:
    _write_atomic(Path(run_dir) / DATA_FILE, json.dumps(manifest, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint directory in ``run_dir`` (reads the directory only)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()]
    return max(steps) if steps else None
