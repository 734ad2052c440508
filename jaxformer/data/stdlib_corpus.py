"""The built-in corpus: this machine's Python standard library source code.

It is always present, needs no download, and is real code (~600 files, ~11 MB on CPython 3.11),
which makes it a good default dataset for smoke tests and small experiments.
"""

import pathlib
import sysconfig

STDLIB = "stdlib"

# Directories whose code we leave out: third-party packages are not the stdlib; the test suites
# are huge and repetitive; idlelib and lib2to3 are large, rarely-read applications. Skipping them
# keeps the corpus at roughly 5-15 MB.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


def stdlib_root() -> pathlib.Path:
    """The directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's own `*.py` files, sorted, without tests and third-party packages."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        # Only the directories below root matter: root itself may sit under any name.
        dirs = path.relative_to(root).parts[:-1]
        if any(d in _EXCLUDED_DIRS for d in dirs):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files)
