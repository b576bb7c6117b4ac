"""``python -m bench [--quick] [--only FIGURE...]``: run the figures in one lab, print one
JSON object per line on stdout, write them to bench/results.json and a markdown table
to stderr and bench/results.md.

A figure that could not be measured is one object with an ``error`` saying why.
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

from bench import media, ng, scale, sip
from bench.env import BenchError, BenchLab

HERE = Path(__file__).resolve().parent

Figure = Callable[[BenchLab, bool], Iterator[dict[str, Any]]]
FIGURES: dict[str, Figure] = {
    "media": lambda lab, quick: media.media_figures(lab, media.QUICK if quick else media.FULL),
    "ng": ng.figures,
    "sip": sip.figures,
    "scale": scale.figures,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run xlat under cProfile, keep the stats in DIR and print the "
                             "top functions of each daemon on stderr")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    with BenchLab(profile=args.profile) as lab:
        for name in args.only:
            t0 = time.monotonic()
            for record in _guarded(name, FIGURES[name], lab, args.quick):
                results.append(record)
                print(json.dumps(record), flush=True)
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results, quick=args.quick, seconds=time.monotonic() - started)
    (HERE / "results.md").write_text(table)
    print(table, file=sys.stderr)
    return 0


def _guarded(name: str, figure: Figure, lab: BenchLab, quick: bool
             ) -> Iterator[dict[str, Any]]:
    """The figure's records; if it breaks, one error record instead of the rest."""
    try:
        yield from figure(lab, quick)
    except (BenchError, OSError, ValueError, KeyError) as e:
        traceback.print_exc(file=sys.stderr)
        yield {"figure": name, "impl": "-", "error": f"{type(e).__name__}: {e}"}


SKIP = {"figure", "impl", "direction", "prog_ids", "trial_s"}


def markdown(results: list[dict[str, Any]], *, quick: bool, seconds: float) -> str:
    """One table per figure: a row per record, a column per field it has."""
    out = [f"Results of `make bench{' QUICK=1' if quick else ''}` "
           f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s, "
           "2 shared cores: compare ratios within a run).\n"]
    figures: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        figures.setdefault(r["figure"], []).append(r)
    for fig, rows in figures.items():
        cols = ["impl", *(["direction"] if any("direction" in r for r in rows) else [])]
        for r in rows:
            cols += [k for k in r if k not in SKIP and k not in cols]
        out.append(f"\n### {fig}\n\n| " + " | ".join(cols) + " |\n|"
                   + "---|" * len(cols) + "\n")
        for r in rows:
            out.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |\n")
    return "".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "/")


if __name__ == "__main__":
    sys.exit(main())
