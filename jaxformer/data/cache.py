"""On-disk cache for trained tokenizers and tokenized documents.

Entries are files named by a hash of everything they depend on, so a stale entry is never read:
changed data or settings give a new name. Every write goes to a temp file in the same directory
and is renamed into place (`os.replace` is atomic), so an interrupted run leaves either the
complete old state or the complete new file, never a truncated one.
"""

import hashlib
import io
import os
import pathlib
import tempfile
import zipfile

import numpy as np

ENV_VAR = "JAXFORMER_CACHE"
DEFAULT_DIR = pathlib.Path("~/.cache/jaxformer")
# Bump when the meaning or layout of cached files changes, to orphan old entries.
CACHE_VERSION = 1


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache root: `cache_dir` if given, else $JAXFORMER_CACHE, else ~/.cache/jaxformer."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR) or DEFAULT_DIR
    return pathlib.Path(cache_dir).expanduser()


def cache_key(*parts: str | bytes | int | float) -> str:
    """Hex digest identifying a cache entry by everything it depends on."""
    h = hashlib.sha256(f"jaxformer-cache-v{CACHE_VERSION}".encode())
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        # Length-prefix each part so that ("ab", "c") and ("a", "bc") hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_token_arrays(path: pathlib.Path, docs: list[np.ndarray]) -> None:
    """Store a list of int32 token arrays as one flat array [sum n_i] plus offsets [n_docs + 1]."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    buf = io.BytesIO()
    np.savez(buf, tokens=flat, offsets=offsets)
    atomic_write_bytes(path, buf.getvalue())


def load_token_arrays(path: pathlib.Path) -> list[np.ndarray] | None:
    """Inverse of `save_token_arrays`; None when the entry is missing or unreadable."""
    try:
        with np.load(path) as f:
            flat, offsets = f["tokens"], f["offsets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # Missing, or (despite atomic writes) damaged, e.g. by a full disk: recompute.
        return None
    if len(offsets) == 1:
        return []
    return np.split(flat, offsets[1:-1])
