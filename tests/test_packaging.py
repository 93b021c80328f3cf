"""The package as users get it: the sdist, a wheel built without a compiler, and (slow) the
Docker image's wheel with the CPU library, installed non-editable outside the source tree.

Wheels are built with the running interpreter's setuptools (``--no-build-isolation``: no
downloads) and installed into fresh virtual environments whose other dependencies (torch,
pydantic, ...) come from this interpreter's site-packages through a ``.pth`` line, so the
tests run offline; ``.ci/run`` repeats the installed-wheel checks with a real ``pip install``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", minversion="77", reason="building pagedopt needs setuptools>=77 (pip install build setuptools)")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import check_wheel  # noqa: E402  (scripts/check_wheel.py)

DOCKERFILE = REPO / "deploy" / "compose" / "Dockerfile"
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "_native"}


def _copy_sources(dest: Path, entries: list[str]) -> Path:
    """Copy ``entries`` (files or directories of the repository) without build leftovers."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(*_SKIP_DIRS, "*.so", "*.o", "*.pyc", "*.egg-info", "*.missing.txt")
    for entry in entries:
        src = REPO / entry
        if src.is_dir():
            shutil.copytree(src, dest / entry, ignore=ignore)
        else:
            shutil.copy2(src, dest / entry)
    return dest


PROJECT_FILES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "pagedopt", "native"]


def _build(kind: str, project: Path, out: Path, **env: str) -> tuple[Path, str]:
    """``build_sdist``/``build_wheel`` through setuptools' PEP 517 backend in ``project``."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print('BUILT', build_meta.build_{kind}({str(out)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=1800,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = re.search(r"^BUILT (\S+)$", result.stdout, re.M).group(1)
    return out / name, result.stdout + result.stderr


def _fresh_venv(where: Path, wheel: Path) -> Path:
    """A new virtual environment with ``wheel`` installed (not editable); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # This interpreter's packages (torch, pydantic, ...) after the venv's own: offline installs.
    Path(purelib, "_pagedopt_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, env=_clean_env(),
    )
    return python


def _clean_env(**env: str) -> dict[str, str]:
    """The environment without what would point an installed pagedopt back at this checkout."""
    hidden = ("PYTHONPATH", "PAGEDOPT_BACKEND", "PAGEDOPT_CPU_LIBRARY", "PAGEDOPT_NATIVE_DIR")
    return {**{k: v for k, v in os.environ.items() if k not in hidden}, **env}


def _run_installed(python: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=_clean_env(**env))


# --- sdist ------------------------------------------------------------------------------------


def test_sdist_has_the_build_inputs_and_no_build_outputs(tmp_path):
    project = _copy_sources(tmp_path / "src", PROJECT_FILES)
    sdist, _ = _build("sdist", project, tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "pagedopt/py.typed",
                     "pagedopt/_version.py", "native/cpu/api.cpp", "native/cuda/optimizer_kernels.cu",
                     "native/cuda/tiling.cuh", "native/include/pagedopt/update.h"):
        assert required in names, required
    assert not [n for n in names if n.endswith((".so", ".o", ".missing.txt")) or "_native" in n]


# --- a wheel without a compiler ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compilerless_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("no-compiler")
    project = _copy_sources(tmp / "src", PROJECT_FILES)
    wheel, log = _build("wheel", project, tmp / "dist", PAGEDOPT_CXX="/bin/false", PAGEDOPT_REQUIRE_NATIVE="")
    return wheel, log


def test_no_compiler_builds_a_wheel_and_says_why(compilerless_wheel):
    wheel, log = compilerless_wheel
    assert "the native CPU library was not built" in log and "pure-torch reference" in log
    assert "PAGEDOPT_REQUIRE_NATIVE=1" in log
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        note = archive.read(check_wheel.MISSING_NOTE).decode()
    assert check_wheel.LIBRARY not in names and "/bin/false" in note
    assert check_wheel.problems(wheel, REPO, native_library=False) == []  # everything else is there
    assert any("libpagedopt_cpu.so" in p for p in check_wheel.problems(wheel, REPO))


def test_no_compiler_and_require_native_fails(tmp_path):
    project = _copy_sources(tmp_path / "src", PROJECT_FILES)
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path / 'dist')!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PAGEDOPT_CXX": "/bin/false", "PAGEDOPT_REQUIRE_NATIVE": "1"})
    assert result.returncode != 0
    assert "compiling the native CPU library failed" in result.stderr


def test_installed_wheel_without_library_warns_without_source_tree_advice(compilerless_wheel, tmp_path):
    wheel, _ = compilerless_wheel
    python = _fresh_venv(tmp_path / "venv", wheel)
    code = (
        "import warnings, torch, pagedopt\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    p = torch.nn.Parameter(torch.randn(5000)); p.grad = torch.randn(5000)\n"
        "    pagedopt.AdamW8bit([p]).step()\n"
        "print([str(w.message) for w in caught if 'native CPU kernels' in str(w.message)][0])\n"
        "print(pagedopt.__file__)\n"
    )
    result = _run_installed(python, ["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    message, location = result.stdout.strip().splitlines()[-2:]
    assert not location.startswith(str(REPO)) and "site-packages" in location
    assert "pip install -e" not in message
    assert "--no-binary pagedopt" in message and "/bin/false" in message


# --- the Docker image's wheel, installed outside the tree (slow: compiles the CPU library) -----


def _dockerfile_build_stage() -> tuple[list[str], dict[str, str], str]:
    """The first stage's COPY sources, ARG defaults and the RUN line that builds the wheel."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stage = text.split("\nFROM ", 2)[1]
    copies = [src for line in re.findall(r"^COPY (?!--from)(.+)$", stage, re.M) for src in line.split()[:-1]]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", stage, re.M))
    (run,) = [line for line in re.findall(r"^RUN (.+)$", stage, re.M) if "pip wheel" in line]
    return copies, args, run


def test_dockerfile_copies_everything_the_build_needs():
    copies, args, run = _dockerfile_build_stage()
    assert set(PROJECT_FILES) <= set(copies), set(PROJECT_FILES) - set(copies)
    assert "PAGEDOPT_REQUIRE_NATIVE=1" in run and args.get("PAGEDOPT_MARCH")
    runtime = DOCKERFILE.read_text().split("\nFROM ")[-1]
    assert "COPY --from=wheel /wheels" in runtime and "pip install --no-cache-dir /wheels/pagedopt-" in runtime
    assert "libgomp1" in runtime  # the CPU library links OpenMP's runtime


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory):
    """The wheel the Dockerfile's first stage builds, built here from the same context."""
    tmp = tmp_path_factory.mktemp("image")
    copies, args, run = _dockerfile_build_stage()
    context = _copy_sources(tmp / "context", copies)
    prefix, _, rest = run.partition("pip wheel")
    env = dict(token.partition("=")[::2] for token in shlex.split(prefix))
    env = {k: v.replace("$PAGEDOPT_MARCH", args["PAGEDOPT_MARCH"]) for k, v in env.items()}
    assert env == {"PAGEDOPT_REQUIRE_NATIVE": "1", "PAGEDOPT_MARCH": args["PAGEDOPT_MARCH"]}
    wheel_args = shlex.split(rest)
    wheel_dir = tmp / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "-q",
               *[a for a in wheel_args if a not in ("--wheel-dir", "/wheels", ".")], "--wheel-dir", str(wheel_dir), "."]
    result = subprocess.run(command, cwd=context, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = wheel_dir.glob("pagedopt-*.whl")
    return wheel


@pytest.mark.slow
def test_image_wheel_is_complete(image_wheel):
    assert check_wheel.problems(image_wheel, REPO) == []
    assert re.search(r"-cp3\d+-cp3\d+-linux_\w+\.whl$", image_wheel.name), image_wheel.name


@pytest.mark.slow
def test_installed_wheel_works_outside_the_source_tree(image_wheel, tmp_path):
    python = _fresh_venv(tmp_path / "venv", image_wheel)
    work = tmp_path / "work"
    work.mkdir()
    cache = {"PAGEDOPT_KERNEL_CACHE": str(tmp_path / "kernels")}

    smoke = _run_installed(python, [str(REPO / "scripts" / "smoke_installed.py"), "--source", str(REPO)], work, **cache)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "optimizers match the reference on the native CPU backend" in smoke.stdout

    report = _run_installed(python, ["-m", "pagedopt", "env", "--json"], work, **cache)
    assert report.returncode == 0, report.stderr
    info = json.loads(report.stdout)
    site = str(tmp_path / "venv")
    assert info["cpu"]["native_library"].startswith(site) and info["cpu"]["available"] is True
    assert info["cuda"]["kernel_sources"].startswith(site) and info["cuda"]["kernel_sources"].endswith("_native")

    version = _run_installed(python, ["-m", "pagedopt", "--version"], work)
    assert version.stdout.strip() == f"pagedopt {info['version']}"

    train = _run_installed(python, ["-m", "pagedopt", "train", "--steps", "5"], work, **cache)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "loss=" in train.stdout
