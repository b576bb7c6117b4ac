"""Which of xlat's sans-I/O cores run compiled (mypyc, built at install time by
setup.py) and which run as the pure Python modules beside them, the fallback with the
same behaviour.

The compiled cores are one group: either all of them load compiled or none does (the
compiled modules call each other directly, so a mix would not be the code either build
tested). They load compiled when every extension module was built from the source that
is there now (the build writes the sources' hashes to `_compiled.json`: an edited
checkout falls back to its .py files until `make setup` builds again) and
XLAT_PURE_PYTHON is unset or empty; otherwise `install()` puts a finder first on
sys.meta_path that loads the .py files. `xlat --version` and `xlat check` say which.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

# The modules setup.py compiles (paths relative to the xlat package).
CORES = (
    "sip/message.py",
    "sip/headers.py",
    "sip/uri.py",
    "sip/transaction.py",
    "sdp.py",
    "control/bencode.py",
    "media/session.py",
)
MANIFEST = "_compiled.json"
PURE_ENV = "XLAT_PURE_PYTHON"
_STALE = "changed since it was compiled (make setup builds it again)"
_PACKAGE = Path(__file__).parent

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    try:
        from mypy_extensions import mypyc_attr
    except ImportError:  # the router needs mypy_extensions only to build

        def mypyc_attr(*_attrs: str, **_kwattrs: object):
            return lambda cls: cls


def module_name(path: str) -> str:
    return "xlat." + path.removesuffix(".py").replace("/", ".")


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check() -> str | None:
    """None when the compiled cores can load, else why not (one line)."""
    if os.environ.get(PURE_ENV):
        return f"{PURE_ENV} is set"
    try:
        built = json.loads((_PACKAGE / MANIFEST).read_text())
    except FileNotFoundError:
        return "not built (no mypyc at install time, or its build failed)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for path in CORES:
        source = _PACKAGE / path
        if not any(
            source.with_suffix(suffix).exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        ):
            return f"no compiled module for {path}"
        if built.get(path) != source_hash(source):
            return f"{path} {_STALE}"
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the cores from their .py files even where a compiled module sits beside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NAMES:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or ():
            file = os.path.join(entry, leaf)
            if os.path.exists(file):
                return importlib.util.spec_from_file_location(fullname, file)
        return None


_NAMES = frozenset(module_name(path) for path in CORES)
FALLBACK_REASON = _check()


def stale() -> bool:
    """Built from sources that have changed since (`make setup` builds them again)."""
    return FALLBACK_REASON is not None and FALLBACK_REASON.endswith(_STALE)


def install() -> None:
    """Called by xlat/__init__.py before any core is imported."""
    if FALLBACK_REASON is not None and not any(
        isinstance(f, _SourceFinder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _SourceFinder())


def describe() -> str:
    """What runs, for `xlat --version` and `xlat check`."""
    if FALLBACK_REASON is None:
        return f"compiled cores (mypyc, {len(CORES)} modules)"
    return f"pure Python cores ({FALLBACK_REASON})"
