"""The compiled cores: the modules xlat/compiled.py lists (the sans-I/O SIP parser,
transactions, SDP rewriter, session core, bencode), compiled with mypyc when the wheel,
`make setup`'s editable install or the .deb is built. All or nothing, and never fatal:
without mypyc (XLAT_NO_MYPYC=1, no mypy at build time) or when mypyc or the C compiler
fails, the build goes on without them and xlat runs its pure Python modules, which it
always ships. The rest of the metadata is in pyproject.toml."""

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_xlat_compiled", HERE / "xlat" / "compiled.py")
assert _spec is not None and _spec.loader is not None
compiled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compiled)


def extensions() -> list:
    if os.environ.get("XLAT_NO_MYPYC"):
        print("xlat: XLAT_NO_MYPYC set: pure Python cores only")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("xlat: no mypyc at build time: pure Python cores only")
        return []
    try:
        return mypycify([f"xlat/{path}" for path in compiled.CORES], group_name="xlat_cores")
    except (Exception, SystemExit) as e:  # mypyc's type check exits on an error
        print(f"xlat: mypyc failed ({e}): pure Python cores only")
        return []


class BuildCores(build_ext):
    """build_ext that drops every compiled core when one fails, and writes the hashes
    of the sources it compiled to xlat/_compiled.json (xlat/compiled.py loads the
    compiled modules only while they match)."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except (BaseError, CCompilerError) as e:
            print(f"xlat: compiling the cores failed ({e}): pure Python cores only")
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            return
        core = compiled.module_name(compiled.CORES[0])
        package = Path(self.get_ext_fullpath(core)).parents[core.count(".") - 1]
        hashes = {path: compiled.source_hash(HERE / "xlat" / path) for path in compiled.CORES}
        (package / compiled.MANIFEST).write_text(json.dumps(hashes, indent=1) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildCores})
