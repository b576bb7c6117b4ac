"""The fuzz targets' smoke test (part of ``make test``): every seed and every crasher
found so far goes through its target again (the crashers are the regression tests of
the bugs they found), then atheris runs each target for a few thousand inputs.
``make fuzz`` runs the same targets for minutes each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets

FUZZ_RUNS = 3000


def _inputs(name: str, kind: str) -> list[Path]:
    dirs = targets.SEEDS[name] if kind == "seeds" else [targets.FUZZ_DIR / "crashers" / name]
    return sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file())


CASES = [pytest.param(name, kind, id=f"{name}-{kind}")
         for name in targets.TARGETS for kind in ("seeds", "crashers")]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_every_seed_and_crasher_passes_its_target(name: str, kind: str) -> None:
    paths = _inputs(name, kind)
    if kind == "seeds":
        assert paths, f"no seed corpus for {name}"
    with targets.logged_exceptions_raise():
        for path in paths:
            targets.TARGETS[name](path.read_bytes())


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_a_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    seeds = [str(d) for d in targets.SEEDS[name] if d.is_dir()]
    r = subprocess.run(
        [sys.executable, str(targets.FUZZ_DIR / "fuzz.py"), name, f"-runs={FUZZ_RUNS}",
         "-seed=1", f"-artifact_prefix={tmp_path}/", str(tmp_path), *seeds],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {FUZZ_RUNS} runs" in r.stderr
