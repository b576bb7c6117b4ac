"""``python -m bench [--quick] [--only FIGURE...] [--profile DIR | --pyspy DIR]``: run the
figures in one lab, print one JSON object per line on stdout, write them to
bench/results.json and a markdown table to stderr and bench/results.md.

A full run (every figure, not quick, not profiled) also rewrites the summary table
between the README's bench markers. A figure that could not be measured is one object
with an ``error`` saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import bpfcost, dns, media, ng, rtpset, scale, sip
from bench.env import PY_SPY, ROOT, BenchError, BenchLab
from bench.summary import MarkerError, markdown, replace_block, summary

HERE = Path(__file__).resolve().parent
README = ROOT / "README.md"

Figure = Callable[[BenchLab, bool], Iterator[dict[str, Any]]]
FIGURES: dict[str, Figure] = {
    "media": lambda lab, quick: media.media_figures(lab, media.QUICK if quick else media.FULL),
    "bpf": bpfcost.figures,
    "ng": ng.figures,
    "sip": sip.figures,
    "dns": dns.figures,
    "scale": scale.figures,
    "ng_set": rtpset.figures,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    profilers = parser.add_mutually_exclusive_group()
    profilers.add_argument("--profile", type=Path, metavar="DIR",
                           help="run xlat under cProfile, keep the stats in DIR and print the "
                                "top functions of each daemon on stderr")
    profilers.add_argument("--pyspy", type=Path, metavar="DIR",
                           help="record each xlat daemon with py-spy while its figure runs, "
                                "keep the stacks in DIR and print each one's top self-time "
                                "functions on stderr")
    args = parser.parse_args(argv)
    if args.pyspy is not None and not PY_SPY.exists():
        parser.error(f"--pyspy: no {PY_SPY} (it comes with the dev extras: make setup)")
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    with BenchLab(profile=args.profile, pyspy=args.pyspy) as lab:
        for name in args.only:
            t0 = time.monotonic()
            for record in _guarded(name, FIGURES[name], lab, args.quick):
                results.append(record)
                print(json.dumps(record), flush=True)
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results, quick=args.quick, when=when, seconds=time.monotonic() - started)
    (HERE / "results.md").write_text(table)
    print(table, file=sys.stderr)
    if args.quick or set(args.only) != set(FIGURES) or args.profile or args.pyspy:
        print("bench: README.md left as it is (only a full, unprofiled run rewrites it)",
              file=sys.stderr)
        return 0
    try:
        README.write_text(replace_block(README.read_text(), summary(results, when=when)))
    except MarkerError as e:
        print(f"bench: README.md not updated: {e}", file=sys.stderr)
        return 1
    print("bench: README.md performance table rewritten", file=sys.stderr)
    return 0


def _guarded(name: str, figure: Figure, lab: BenchLab, quick: bool
             ) -> Iterator[dict[str, Any]]:
    """The figure's records; if it breaks, one error record instead of the rest."""
    try:
        yield from figure(lab, quick)
    except (BenchError, OSError, ValueError, KeyError) as e:
        traceback.print_exc(file=sys.stderr)
        yield {"figure": name, "impl": "-", "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    sys.exit(main())
