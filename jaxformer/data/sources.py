"""Load raw text documents: the stdlib corpus, a file or directory, or a Hub dataset."""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import stat
from types import ModuleType
from typing import Any

from jaxformer.data.errors import DataError
from jaxformer.data.manifest import files_manifest, hub_manifest
from jaxformer.data.stdlib_corpus import STDLIB, stdlib_files, stdlib_root

__all__ = ["SKIP_REASONS", "STDLIB", "LoadedDocuments", "load_documents", "stdlib_files"]

_JSON_SUFFIXES = (".jsonl", ".json")
# "name" or "owner/name", as the Hub spells dataset ids.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Why a file is left out, in the order the log line counts them.
SKIP_REASONS = ("unreadable", "empty", "binary", "not UTF-8")
# How the one-line error says that every file was left out for the same reason.
_ALL_SKIPPED = {
    "unreadable": "are unreadable",
    "empty": "are empty (or whitespace only)",
    "binary": "are binary (contain NUL bytes)",
    "not UTF-8": "are not valid UTF-8",
}


@dataclasses.dataclass
class LoadedDocuments:
    """Non-empty documents plus what is needed to cache work derived from them.

    `fingerprint` is a hex digest of the documents' contents (the used files' relative paths
    and sha256 digests, plus the JSON text field): the cache key of work derived from them.
    `skipped` lists the files left out (`n_skipped` of the `n_files` listed) and
    `skip_reasons[i]` why `skipped[i]` was (one of SKIP_REASONS). `manifest` describes the data
    source for a resumed run to compare (`jaxformer.data.manifest`).
    """

    texts: list[str]
    fingerprint: str
    n_skipped: int
    skipped: list[str]
    skip_reasons: list[str] = dataclasses.field(default_factory=list)
    n_files: int = 0
    manifest: dict[str, Any] | None = None

    def skip_counts(self) -> dict[str, int]:
        """{reason: files skipped for it}, only reasons that occur, in SKIP_REASONS order."""
        counts = {r: self.skip_reasons.count(r) for r in SKIP_REASONS}
        return {r: n for r, n in counts.items() if n}

    def skip_summary(self) -> str:
        """"skipped 2 of 20 files: 1 empty, 1 binary; e.g. PATH", or "" when none was."""
        if not self.n_skipped:
            return ""
        counts = ", ".join(f"{n} {r}" for r, n in self.skip_counts().items())
        of = f" of {self.n_files}" if self.n_files else ""
        return f"skipped {self.n_skipped}{of} files: {counts}; e.g. {self.skipped[0]}"


def load_documents(
    source: str, text_field: str = "text", cache_dir: str | None = None
) -> LoadedDocuments:
    """Load the documents of `source`.

    `source` is `"stdlib"` (this machine's Python standard library, one document per file), a
    file or directory (`.jsonl`/`.json` files are JSON lines with one document per line in
    `text_field`; any other file is one plain-text document), or a Hub dataset name. `cache_dir`
    is where `datasets` keeps its Arrow files for local data. Whitespace-only documents are
    dropped. Files that cannot be read, are empty (or whitespace only), are binary (hold a NUL
    byte) or are not UTF-8 are skipped and counted (`LoadedDocuments.skip_summary`). Raises
    DataError, naming the source, when there is nothing usable to load.
    """
    if source == STDLIB:
        return _load_files(stdlib_files(), stdlib_root(), "the stdlib corpus", text_field,
                           cache_dir, manifest_kind="stdlib", source=STDLIB)
    path = pathlib.Path(source).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
        return _load_files(_list_files(path), root, str(path), text_field, cache_dir,
                           manifest_kind="files", source=source)
    if _HUB_NAME.fullmatch(source):
        return _load_hub(source, text_field)
    raise DataError(f"data path {source} does not exist")


def _datasets() -> ModuleType:
    """The `datasets` module, silenced (no progress bars, errors only).

    Imported lazily: it takes ~1 s, which commands that never touch data should not pay.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _list_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data path {path} is neither a file nor a directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if _is_listed(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"data directory {path} contains no (non-hidden) files")
    return files


def _is_listed(p: pathlib.Path) -> bool:
    """A regular file, or a dangling symlink (listed so that it is counted as unreadable rather
    than silently missing). FIFOs, sockets and devices are not data and could block a read."""
    return p.is_file() or (p.is_symlink() and not p.exists())


def _read_file(path: pathlib.Path) -> bytes:
    """The bytes of regular file `path`; OSError when it cannot be read (gone, a broken link,
    no permission, not a regular file)."""
    # O_NONBLOCK: a file replaced by a FIFO since the listing must not hang the open.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _load_files(
    files: list[pathlib.Path],
    root: pathlib.Path,
    label: str,
    text_field: str,
    cache_dir: str | None,
    manifest_kind: str = "files",
    source: str | None = None,
) -> LoadedDocuments:
    """Read and check every file, then load the good ones through `datasets`.

    `root` is the directory the manifest's and fingerprint's paths are relative to; `source`
    is how the manifest names the data (default `label`).
    """
    good: list[pathlib.Path] = []
    skipped: list[str] = []
    reasons: list[str] = []
    entries: list[dict[str, Any]] = []  # the manifest's files
    digests: dict[pathlib.Path, str] = {}
    first_error = ""  # why the first unreadable file could not be read, for the error
    for path in files:
        rel = _relative(path, root)
        try:
            raw = _read_file(path)
        except OSError as e:
            # Gone since the listing, a broken link, no permission: leave it out, and say so.
            skipped.append(str(path))
            reasons.append("unreadable")
            entries.append({"path": rel, "size": None, "sha256": None, "skipped": "unreadable"})
            first_error = first_error or (e.strerror or type(e).__name__)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        entry: dict[str, Any] = {"path": rel, "size": len(raw), "sha256": digest}
        entries.append(entry)
        reason = _bad_content(raw)
        if reason:
            skipped.append(str(path))
            reasons.append(reason)
            entry["skipped"] = reason
            continue
        good.append(path)
        digests[path] = digest
    if not good:
        raise DataError(_all_skipped(label, skipped, reasons, first_error))

    has_json = any(p.suffix in _JSON_SUFFIXES for p in good)
    # Contents, not (path, size, mtime): `touch` or moving the data keeps the caches, and an
    # edit that keeps size and mtime still invalidates them. Relative paths fix the document
    # order. The text field only changes the documents when there are JSON files to read it.
    key: list[Any] = [
        "content-v2",
        [(_relative(p, root), digests[p]) for p in good],
        text_field if has_json else None,
    ]
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    any_json = any(p.suffix in _JSON_SUFFIXES for p in files)
    manifest = files_manifest(manifest_kind, source or label, entries,
                              text_field if any_json else None)

    docs_by_file: dict[pathlib.Path, list[str]] = {}
    plain = [p for p in good if p.suffix not in _JSON_SUFFIXES]
    if plain:
        ds = _call_datasets(
            label,
            "text",
            data_files=[str(p) for p in plain],
            sample_by="document",
            split="train",
            cache_dir=cache_dir,
        )
        # sample_by="document" yields exactly one row per file, in data_files order.
        for path, text in zip(plain, ds["text"], strict=True):
            docs_by_file[path] = [text]
    for path in good:
        if path.suffix in _JSON_SUFFIXES:
            docs_by_file[path] = _load_json_file(path, text_field, cache_dir)

    texts: list[str] = []
    for path in good:  # back to sorted file order, whatever the file types
        texts.extend(docs_by_file[path])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"no non-empty documents in {label}")
    return LoadedDocuments(texts, fingerprint, len(skipped), skipped, reasons, len(files),
                           manifest)


def _bad_content(raw: bytes) -> str | None:
    """Why a file with bytes `raw` holds no usable document (a SKIP_REASONS entry), or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    # NUL decodes as UTF-8 but never occurs in text: the file is binary (an image, an archive,
    # UTF-16 text).
    if "\0" in text:
        return "binary"
    # A whitespace-only file holds no document; not handing it to `datasets` also keeps the
    # json loader away from empty files, which it rejects.
    if not text.strip():
        return "empty"
    return None


def _all_skipped(label: str, skipped: list[str], reasons: list[str], first_error: str) -> str:
    """The one-line error when every file of `label` was skipped."""
    kinds = [r for r in SKIP_REASONS if r in reasons]
    if len(kinds) == 1:
        why = _ALL_SKIPPED[kinds[0]]
    else:
        why = "were skipped: " + ", ".join(f"{reasons.count(r)} {r}" for r in kinds)
    example = skipped[0]
    if reasons[0] == "unreadable" and first_error:
        example += f": {first_error}"
    return f"no usable data in {label}: all {len(skipped)} files {why} (e.g. {example})"


def _relative(path: pathlib.Path, root: pathlib.Path) -> str:
    """`path` relative to `root`, with forward slashes (the same name on every OS)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # not under root (a caller-built file list): its full path
        return path.as_posix()


def _load_json_file(path: pathlib.Path, text_field: str, cache_dir: str | None) -> list[str]:
    # One file per call so that a missing field or a parse error names the exact file.
    ds = _call_datasets(
        str(path), "json", data_files=[str(path)], split="train", cache_dir=cache_dir
    )
    return _text_column(ds, text_field, str(path))


def _load_hub(name: str, text_field: str) -> LoadedDocuments:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the Hub client raises many types; all mean "could not load"
        raise DataError(
            f"could not load data {name!r}: it is not an existing path, and loading it as a "
            f"Hugging Face Hub dataset failed ({_one_line(e)})"
        ) from e
    texts = [t for t in _text_column(ds, text_field, name) if t.strip()]
    if not texts:
        raise DataError(f"no non-empty documents in Hub dataset {name}")
    fingerprint = hashlib.sha256(f"hub:{name}:{ds._fingerprint}:{text_field}".encode()).hexdigest()
    return LoadedDocuments(texts, fingerprint, 0, [],
                           manifest=hub_manifest(name, ds._fingerprint, text_field))


def _call_datasets(label: str, builder: str, **kwargs: Any) -> Any:
    datasets = _datasets()
    try:
        return datasets.load_dataset(builder, **kwargs)
    except Exception as e:  # parse errors come as several pyarrow/datasets types
        raise DataError(f"cannot load {label} as {builder} data ({_one_line(e)})") from e


def _text_column(ds: Any, text_field: str, label: str) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(
            f"{label} has no {text_field!r} field (fields: {', '.join(ds.column_names)}); "
            "choose the text field to train on"
        )
    texts = []
    for value in ds[text_field]:
        if value is None:  # a record without text holds no document
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{label}: field {text_field!r} holds {type(value).__name__} values, not text"
            )
        texts.append(value)
    return texts


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."
