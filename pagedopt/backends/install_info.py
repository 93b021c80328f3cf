"""How this pagedopt was installed: a source checkout or a built wheel/sdist.

The fallback warnings need it: a wheel user has no source tree to run ``pip install -e .``
in, so the advice differs. ``setup.py`` leaves a note next to the CPU library when it could
not build it (no compiler, a compile error), and the warning repeats that reason.

Example:
    >>> from pagedopt.backends import install_info
    >>> hint = install_info.cpu_rebuild_hint()
    >>> ("pip install" in hint) or ("setup.py" in hint)
    True
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Written by setup.py's build_ext when the native CPU library could not be built.
NATIVE_BUILD_NOTE = "libpagedopt_cpu.missing.txt"


def source_checkout() -> Path | None:
    """The repository root when pagedopt runs from a checkout (editable or PYTHONPATH), else None."""
    root = PACKAGE_DIR.parent
    if (root / "setup.py").is_file() and (root / "native" / "cpu").is_dir():
        return root
    return None


def native_build_note() -> str | None:
    """Why the build left out the native CPU library (None when it did not, or no note exists)."""
    note = PACKAGE_DIR / "backends" / NATIVE_BUILD_NOTE
    try:
        return note.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def cpu_rebuild_hint() -> str:
    """What to run to get the native CPU library, for this kind of install."""
    root = source_checkout()
    if root is not None:
        return (
            "rebuild it with `pip install -e .` (or `python setup.py build_ext --inplace`) in the pagedopt "
            f"source tree {root}"
        )
    hint = (
        "build pagedopt from source on this machine with a C++17 compiler and OpenMP (g++): "
        "`pip install --force-reinstall --no-deps --no-binary pagedopt pagedopt` "
        "(PAGEDOPT_MARCH picks the CPU target; see the README's Install section)"
    )
    note = native_build_note()
    return f"{hint}. When this pagedopt was built: {note}" if note else hint
