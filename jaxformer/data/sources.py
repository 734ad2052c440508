"""Load raw text documents: the stdlib corpus, a file or directory, or a Hub dataset."""

import dataclasses
import hashlib
import json
import pathlib
import re
from types import ModuleType
from typing import Any

from jaxformer.data.errors import DataError
from jaxformer.data.stdlib_corpus import STDLIB, stdlib_files

__all__ = ["STDLIB", "LoadedDocuments", "load_documents", "stdlib_files"]

_JSON_SUFFIXES = (".jsonl", ".json")
# "name" or "owner/name", as the Hub spells dataset ids.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass
class LoadedDocuments:
    """Non-empty documents plus what is needed to cache work derived from them.

    `fingerprint` is a hex digest that changes whenever the underlying data changes; `skipped`
    lists the files left out because they are not valid UTF-8.
    """

    texts: list[str]
    fingerprint: str
    n_skipped: int
    skipped: list[str]


def load_documents(
    source: str, text_field: str = "text", cache_dir: str | None = None
) -> LoadedDocuments:
    """Load the documents of `source`.

    `source` is `"stdlib"` (this machine's Python standard library, one document per file), a
    file or directory (`.jsonl`/`.json` files are JSON lines with one document per line in
    `text_field`; any other file is one plain-text document), or a Hub dataset name. `cache_dir`
    is where `datasets` keeps its Arrow files for local data. Whitespace-only documents are
    dropped. Raises DataError, naming the source, when there is nothing usable to load.
    """
    if source == STDLIB:
        return _load_files(stdlib_files(), "the stdlib corpus", text_field, cache_dir)
    path = pathlib.Path(source).expanduser()
    if path.exists():
        return _load_files(_list_files(path), str(path), text_field, cache_dir)
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
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"data directory {path} contains no (non-hidden) files")
    return files


def _load_files(
    files: list[pathlib.Path], label: str, text_field: str, cache_dir: str | None
) -> LoadedDocuments:
    """Check every file is UTF-8, then load the good ones through `datasets`."""
    stats = []
    good: list[pathlib.Path] = []
    skipped: list[str] = []
    for path in files:
        try:
            raw = path.read_bytes()
            stat = path.stat()
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e.strerror}") from e
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(str(path))
            continue
        # A whitespace-only file holds no document; not handing it to `datasets` also keeps
        # the json loader away from empty files, which it rejects.
        if text.strip():
            good.append(path)
    if len(skipped) == len(files):
        raise DataError(
            f"no usable data in {label}: all {len(files)} files are not valid UTF-8 "
            f"(e.g. {skipped[0]})"
        )

    has_json = any(p.suffix in _JSON_SUFFIXES for p in files)
    # The text field only changes the documents when there are JSON files to read it from.
    key: list[Any] = [sorted(stats), text_field if has_json else None]
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()

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
    return LoadedDocuments(texts, fingerprint, len(skipped), skipped)


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
    return LoadedDocuments(texts, fingerprint, 0, [])


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
