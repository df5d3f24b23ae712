"""Summarise py-spy `--format raw` (collapsed stacks) into self / inclusive hot-spot lists.

A flame graph shows shape; this answers "which functions and lines cost most" as text that can be
pasted into a report or compared between runs.

    python bench/hotspots.py PROFILE.txt [--top N]
"""

from __future__ import annotations

import argparse
import linecache
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# py-spy frames look like "func (/abs/path/file.py:123)"; line numbers may be absent.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PREFIXES = ("/site-packages/", "/src/", "/lib/python3")


@dataclass
class Hotspots:
    total: int = 0
    self_fn: Counter[str] = field(default_factory=Counter)
    incl_fn: Counter[str] = field(default_factory=Counter)
    self_line: Counter[str] = field(default_factory=Counter)


def _short(path: str) -> str:
    """Drop install prefixes so frames read 'twinvol/nbd/aio.py' rather than a venv path."""
    for p in _PREFIXES:
        i = path.rfind(p)
        if i >= 0:
            rest = path[i + len(p):]
            return rest.split("/", 1)[1] if p == "/lib/python3" and "/" in rest else rest
    return path


SourceLine = Callable[[str, int], str]  # (path, line number) -> source text, "" if unknown


def _parse(frame: str, source: SourceLine) -> tuple[str, str]:
    """(function key, line key) of one frame; the line key quotes the source when known."""
    m = _FRAME.match(frame)
    if not m:
        return frame, frame
    fn = f"{m['func']} ({_short(m['file'])})"
    if not m["line"]:
        return fn, fn
    text = source(m["file"], int(m["line"])).strip()
    return fn, f"{fn[:-1]}:{m['line']})" + (f"  {text}" if text else "")


def summarise(raw: str, source: SourceLine | None = None) -> Hotspots:
    """Count samples per function and line.

    `source` should return the code as it was when profiled; the default reads the files now,
    which quotes the wrong lines if they were edited since.
    """
    src = source or linecache.getline
    h = Hotspots()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_parse(f, src) for f in stack.split(";")]
        h.total += n
        h.self_fn[frames[-1][0]] += n
        h.self_line[frames[-1][1]] += n
        for fn in {f[0] for f in frames}:  # once per stack, so recursion is not double counted
            h.incl_fn[fn] += n
    return h


def format_hotspots(h: Hotspots, top: int = 15) -> str:
    if not h.total:
        return "no samples (was the process idle, or did py-spy fail to attach?)"
    out = [f"{h.total} samples (idle threads excluded); time in C calls and syscalls counts "
           "as self time of the Python line that made them"]
    # Frames on every stack (interpreter start-up, CLI, event loop entry) say nothing.
    incl = Counter({k: n for k, n in h.incl_fn.items() if n < h.total})
    for title, counter in (("self time by function", h.self_fn),
                           ("self time by line", h.self_line),
                           ("inclusive time by function (frames on every stack omitted)", incl)):
        out.append(f"  {title}:")
        out += [f"    {100 * n / h.total:5.1f}%  {key}" for key, n in counter.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("profile", type=Path, help="py-spy record --format raw output")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    print(format_hotspots(summarise(args.profile.read_text()), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
