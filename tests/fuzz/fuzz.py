"""Coverage-guided fuzzing of one target with atheris (libFuzzer).

    python tests/fuzz/fuzz.py TARGET|all [libFuzzer options] [CORPUS_DIR ...]

e.g. ``python tests/fuzz/fuzz.py sdp -max_total_time=60``; ``all`` runs every target
one after the other, each in its own process (``make fuzz``). Without a CORPUS_DIR,
new inputs go to build/fuzz/TARGET/ and the seeds are read from the target's seed
directories (targets.SEEDS), which stay untouched. xlat's modules are instrumented;
a crash leaves its input where ``-artifact_prefix`` says: copy it to
tests/fuzz/crashers/TARGET/ and it becomes a regression test (test_fuzz_smoke.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["xlat"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*targets.TARGETS, "all"):
        sys.exit(f"usage: fuzz.py {{{'|'.join(targets.TARGETS)}|all}} [libFuzzer options]")
    name = sys.argv[1]
    if name == "all":
        failed = []
        for each in targets.TARGETS:
            print(f"== fuzz {each}", flush=True)
            options = [a.replace("{target}", each) for a in sys.argv[2:]]
            if subprocess.run([sys.executable, __file__, each, *options]).returncode:
                failed.append(each)
        sys.exit(f"fuzz: crashes in {', '.join(failed)}" if failed else 0)
    args = sys.argv[2:]
    if not [a for a in args if not a.startswith("-")]:
        work = Path("build") / "fuzz" / name
        work.mkdir(parents=True, exist_ok=True)
        args += [str(work), *(str(d) for d in targets.SEEDS[name] if d.is_dir())]
    atheris.Setup([sys.argv[0], *args], targets.TARGETS[name])
    with targets.logged_exceptions_raise():
        atheris.Fuzz()


if __name__ == "__main__":
    main()
