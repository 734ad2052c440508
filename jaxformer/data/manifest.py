"""Data manifests: a JSON-serializable description of a run's data, to tell on resume whether
the data changed since the run began.

A manifest is a dict:

    {"version": 1, "kind": "files" | "stdlib" | "hub" | "synthetic" | "bundled",
     "source": str, ...}

plus, by kind:

    files, stdlib  "files": [{"path": relative path (posix), "size": bytes or None,
                              "sha256": hex digest or None}, ...] sorted by path, with
                   "skipped": reason on files the loader left out (None size and digest: the
                   file could not be read); "text_field" when there are JSON files
    hub            "fingerprint": the `datasets` fingerprint of the dataset, "text_field"
    synthetic      nothing more: the pairs are a pure function of the config
    bundled        "sha256": the digest of a dataset that ships inside a package (scikit-learn's
                   digits), which a new version of that package could change

Only contents count: a file whose mtime changed but whose bytes did not (``touch``) leaves the
manifest equal.
"""

from __future__ import annotations

from typing import Any

VERSION = 1
# How many names of each kind of change `describe_change` lists before "and N more".
_MAX_NAMES = 3

Manifest = dict[str, Any]


def files_manifest(kind: str, source: str, files: list[dict[str, Any]],
                   text_field: str | None) -> Manifest:
    """The manifest of a file-based source (``kind`` "files" or "stdlib"); ``files`` as in the
    module docstring, in any order; ``text_field`` None when no file is JSON."""
    manifest: Manifest = {"version": VERSION, "kind": kind, "source": source,
                          "files": sorted(files, key=lambda f: f["path"])}
    if text_field is not None:
        manifest["text_field"] = text_field
    return manifest


def hub_manifest(name: str, fingerprint: str, text_field: str) -> Manifest:
    """The manifest of Hub dataset ``name`` (``fingerprint``: its ``datasets`` fingerprint)."""
    return {"version": VERSION, "kind": "hub", "source": name, "fingerprint": fingerprint,
            "text_field": text_field}


def synthetic_manifest(source: str) -> Manifest:
    """The manifest of a generated source (``synthetic:<task>``): only its name."""
    return {"version": VERSION, "kind": "synthetic", "source": source}


def bundled_manifest(source: str, sha256: str) -> Manifest:
    """The manifest of a dataset bundled with a package (``image:digits``): its digest."""
    return {"version": VERSION, "kind": "bundled", "source": source, "sha256": sha256}


def describe_change(saved: Manifest, current: Manifest) -> str | None:
    """None when ``current`` describes the same data as ``saved``; otherwise one line that says
    what changed, e.g. ``data source corpus/ changed since the run began: 1 file added (c.txt),
    1 changed (a.txt), 0 removed`` or ``data source changed from corpus/ to other/``."""
    if saved == current:
        return None
    old_source, new_source = saved.get("source"), current.get("source")
    if old_source != new_source or saved.get("kind") != current.get("kind"):
        return f"data source changed from {old_source} to {new_source}"
    parts = []
    if "files" in saved or "files" in current:
        old = _by_path(saved.get("files"))
        new = _by_path(current.get("files"))
        added = [p for p in new if p not in old]
        removed = [p for p in old if p not in new]
        changed = [p for p in new if p in old and new[p] != old[p]]
        if added or removed or changed:
            parts.append(f"{_count(added, 'file added', 'files added')}, "
                         f"{_count(changed, 'changed')}, {_count(removed, 'removed')}")
    for key in sorted((saved.keys() | current.keys()) - {"files", "source", "kind"}):
        if saved.get(key) != current.get(key):
            parts.append(f"{key} {saved.get(key)!r} -> {current.get(key)!r}")
    if not parts:  # only the order of the file entries differs: the same data
        return None
    return f"data source {new_source} changed since the run began: {'; '.join(parts)}"


def _by_path(files: Any) -> dict[str, Any]:
    """{path: the rest of its entry}; tolerant of a hand-edited or truncated manifest."""
    if not isinstance(files, list):
        return {}
    return {f["path"]: {k: v for k, v in f.items() if k != "path"}
            for f in files if isinstance(f, dict) and "path" in f}


def _count(names: list[str], singular: str, plural: str | None = None) -> str:
    """3, "changed" -> "3 changed (a, b, c)"; more than _MAX_NAMES end with "and N more"."""
    label = singular if len(names) == 1 or plural is None else plural
    text = f"{len(names)} {label}"
    if names:
        shown = ", ".join(sorted(names)[:_MAX_NAMES])
        if len(names) > _MAX_NAMES:
            shown += f" and {len(names) - _MAX_NAMES} more"
        text += f" ({shown})"
    return text
