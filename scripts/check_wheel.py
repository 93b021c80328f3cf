#!/usr/bin/env python3
"""Check that a built pagedopt wheel holds every file the installed package needs at run time.

    python scripts/check_wheel.py dist/pagedopt-0.1.0-cp311-cp311-linux_x86_64.whl

Compares the wheel with the source tree it was built from: every module under ``pagedopt/``,
``py.typed``, every CUDA source and header of ``native/cuda`` and ``native/include`` (as
``pagedopt/_native/...``), the native CPU library, the ``pagedopt`` console script, and a
platform tag (a ``py3-none-any`` wheel has no CPU library). Exits 1 with the list of what is
missing; ``--allow-no-native`` accepts a wheel built without a compiler.
"""

from __future__ import annotations

import argparse
import configparser
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "pagedopt/backends/libpagedopt_cpu.so"
MISSING_NOTE = "pagedopt/backends/libpagedopt_cpu.missing.txt"


def expected_files(root: Path, *, native_library: bool = True) -> set[str]:
    """Paths (inside the wheel) the runtime needs, derived from the source tree at ``root``."""
    files = {p.relative_to(root).as_posix() for p in (root / "pagedopt").rglob("*.py")}
    files = {f for f in files if "/_native/" not in f and "__pycache__" not in f}
    files.add("pagedopt/py.typed")
    for sub in ("cuda", "include"):
        for src in (root / "native" / sub).rglob("*"):
            if src.is_file() and src.suffix in (".cu", ".cuh", ".h"):
                files.add("pagedopt/_native/" + src.relative_to(root / "native").as_posix())
    if native_library:
        files.add(LIBRARY)
    return files


def problems(wheel: Path, root: Path = ROOT, *, native_library: bool = True) -> list[str]:
    """Everything wrong with ``wheel`` (an empty list when it is complete)."""
    out = []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next((n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")), None)
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode() if dist_info else ""
    for missing in sorted(expected_files(root, native_library=native_library) - names):
        out.append(f"missing {missing}")
    if native_library and MISSING_NOTE in names:
        out.append(f"{MISSING_NOTE} is present: the CPU library failed to build")
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    if not scripts.has_section("console_scripts") or scripts["console_scripts"].get("pagedopt") != "pagedopt.cli:main":
        out.append("no `pagedopt` console script in entry_points.txt")
    if native_library and wheel.name.endswith("-none-any.whl"):
        out.append(f"{wheel.name} is a pure-Python wheel: it cannot carry the CPU library")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--source", type=Path, default=ROOT, help="the source tree (default: this checkout)")
    parser.add_argument("--allow-no-native", action="store_true", help="accept a wheel without the CPU library")
    args = parser.parse_args(argv)
    found = problems(args.wheel, args.source, native_library=not args.allow_no_native)
    for line in found:
        print(f"check_wheel: {args.wheel.name}: {line}", file=sys.stderr)
    if not found:
        count = len(expected_files(args.source, native_library=not args.allow_no_native))
        print(f"check_wheel: {args.wheel.name} has all {count} runtime files")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
