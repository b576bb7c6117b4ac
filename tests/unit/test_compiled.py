"""The compiled cores (setup.py, mypyc) and their pure Python fallback (xlat/compiled.py):
which one loads, and that an edited source or XLAT_PURE_PYTHON loads the .py files.
`make unit-pure` runs the cores' unit tests under the fallback; the other runs use the
compiled modules when `make setup` built them."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xlat import compiled

PACKAGE = Path(compiled.__file__).parent
PROBE = (
    "import xlat.compiled as c, xlat.sdp as s, xlat.sip.message as m;"
    "print(c.describe()); print(s.__file__); print(m.__file__);"
    "print(m.parse_message(b'OPTIONS sip:a@b SIP/2.0\\r\\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\\r\\n"
    "From: <sip:x@y>;tag=1\\r\\nTo: <sip:a@b>\\r\\nCall-ID: c\\r\\nCSeq: 1 OPTIONS\\r\\n"
    "Content-Length: 0\\r\\n\\r\\n').method)"
)


def _probe(env_extra: dict[str, str], path: Path | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV} | env_extra
    if path is not None:
        env["PYTHONPATH"] = str(path)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=path or PACKAGE.parent,
        capture_output=True, text=True, check=True,
    )
    return out.stdout.splitlines()


def test_loaded_cores_are_what_describe_says() -> None:
    for path in compiled.CORES:
        module = importlib.import_module(compiled.module_name(path))
        assert str(module.__file__).endswith(".py") == (compiled.FALLBACK_REASON is not None)
    assert compiled.describe().startswith(
        "compiled" if compiled.FALLBACK_REASON is None else "pure Python"
    )


def test_pure_env_loads_the_sources() -> None:
    described, sdp, message, method = _probe({compiled.PURE_ENV: "1"})
    assert described == f"pure Python cores ({compiled.PURE_ENV} is set)"
    assert sdp.endswith("xlat/sdp.py") and message.endswith("xlat/sip/message.py")
    assert method == "OPTIONS"


def test_edited_source_falls_back_to_all_sources(tmp_path: Path) -> None:
    """A checkout edited after `make setup`: the compiled group would run old code, so
    every core loads from its .py (not just the edited one: the group is all or none)."""
    normal = _probe({})[0]
    if normal.startswith("pure Python cores (not built"):
        pytest.skip("no compiled cores in this install (setup.py built none)")
    shutil.copytree(PACKAGE, tmp_path / "xlat", symlinks=True)
    for lib in PACKAGE.parent.glob("xlat_cores__mypyc*"):
        shutil.copy(lib, tmp_path)
    assert _probe({}, tmp_path)[0] == normal  # the copy as built: as the install
    with (tmp_path / "xlat" / "sdp.py").open("a") as f:
        f.write("# edited\n")
    described, sdp, message, method = _probe({}, tmp_path)
    assert described == f"pure Python cores (sdp.py {compiled._STALE})"
    assert sdp == str(tmp_path / "xlat" / "sdp.py")
    assert message == str(tmp_path / "xlat" / "sip" / "message.py")
    assert method == "OPTIONS"
