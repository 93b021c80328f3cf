#!/usr/bin/env python3
"""Smoke test of an installed (non-editable) pagedopt, run outside the source tree.

    cd /tmp && /path/to/venv/bin/python /path/to/scripts/smoke_installed.py --source /path/to/checkout

Checks that pagedopt, its CPU library and its CUDA kernel sources come from the installed
package (not from the checkout), then steps every optimizer class a few times on the native
CPU backend and on the pure-torch reference and compares them (the CPU kernels compute what
the reference computes). With NVRTC installed it also compiles one CUDA program from the
installed sources. Exits non-zero with the reason on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def _fail(message: str) -> None:
    print(f"smoke_installed: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _run_steps(name: str, backend: str | None, steps: int = 3):
    import torch

    import pagedopt
    from pagedopt.functional import dispatch

    if backend is None:
        os.environ.pop(dispatch.FORCE_ENV, None)
    else:
        os.environ[dispatch.FORCE_ENV] = backend
    dispatch.reset_backends()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4097)), torch.nn.Parameter(torch.randn(3, 5))]
    kwargs = {"momentum": 0.9} if ("SGD" in name or "LARS" in name) else {}
    opt = getattr(pagedopt, name)(params, lr=1e-3, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in params]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the checkout the wheel was built from")
    parser.add_argument("--allow-no-native", action="store_true", help="accept a missing CPU library")
    args = parser.parse_args(argv)

    import torch

    import pagedopt
    from pagedopt.backends import cpu, cuda_compiler

    package = Path(pagedopt.__file__).parent
    if _inside(package, args.source):
        _fail(f"pagedopt was imported from the checkout ({package}), not from an installed package")
    sources = cuda_compiler.native_dir()
    if not _inside(sources, package):
        _fail(f"CUDA kernel sources resolve to {sources}, not to the installed package {package}")
    lib = cpu.library()
    if lib is None and not args.allow_no_native:
        _fail(f"the native CPU library did not load: {cpu.unavailable_reason()}")
    if lib is not None and not _inside(lib.path, package):
        _fail(f"the CPU library was loaded from {lib.path}, outside the package")

    names = [n for n in pagedopt.OPTIMIZER_NAMES if not n.startswith("Paged")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference run may warn about itself
        for name in names:
            native = _run_steps(name, None)
            reference = _run_steps(name, "reference")
            for got, want in zip(native, reference):
                if not torch.isfinite(got).all():
                    _fail(f"{name}: non-finite parameters after 3 steps")
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        _run_steps("PagedAdamW8bit", None)
    print(f"smoke_installed: {len(names)} optimizers match the reference on the "
          f"{'native' if lib is not None else 'reference'} CPU backend; pagedopt {pagedopt.__version__} from {package}")

    try:
        cuda_compiler.nvrtc_version()
    except cuda_compiler.NvrtcUnavailableError as exc:
        print(f"smoke_installed: NVRTC unavailable, CUDA compile skipped ({exc})")
        return 0
    from pagedopt.backends.cuda_catalog import all_programs

    spec = min(all_programs(), key=lambda p: len(p.kernels))
    program = cuda_compiler.compile_program(spec, "sm_90")
    if program.cubin[:4] != b"\x7fELF":
        _fail(f"NVRTC returned no cubin for {spec.slug}")
    print(f"smoke_installed: compiled {spec.slug} for sm_90 from {sources}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
