"""Side-by-side optimizer-step benchmark on CPU (the ``pagedopt bench`` command).

All candidates run in one process on the same parameters and gradients. Steps are
interleaved - each repeat round times one step of every candidate, in a rotating order - so
machine noise (other jobs, frequency changes) hits all of them alike, and each candidate's
result is the median over rounds. Two cases:

* ``a``: one 32M-parameter fp32 tensor (``--numel`` changes the size);
* ``b``: the parameter list of a GPT-2-small-shaped model (124M parameters; ``--layers``).

For each candidate the table shows ms/step, ns/param, the achieved bandwidth at the counted
bytes (parameter read + write, gradient read, every state read + write: 28 B/param for fp32
AdamW, 16 B/param for 8-bit AdamW; absmax and other per-block data are not counted) and the
ratio of step times against ``torch.optim.AdamW(fused=True)``.

Example:
    >>> from pagedopt.bench import gpt2_small_shapes, counted_bytes_per_element
    >>> sum(r * c for r, c in (s if len(s) == 2 else (s[0], 1) for s in gpt2_small_shapes()))
    124439808
    >>> counted_bytes_per_element(element_size=4, state_values=2, state_bytes=1)
    16
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Sequence

import torch

DEFAULT_NUMEL = 32 * 1024 * 1024
DEFAULT_OPTIMIZERS = (
    "pagedopt-adamw8bit", "pagedopt-adamw32bit", "torch-fused", "torch-foreach", "bnb-adamw8bit", "torchao-adamw8bit",
)
# pagedopt's 8-bit optimizers (for "every other 8-bit optimizer within 1.3x of 8-bit AdamW")
PAGEDOPT_8BIT = ("adamw8bit", "adam8bit", "ademamix8bit", "lion8bit", "sgd8bit", "rmsprop8bit", "adagrad8bit",
                 "lamb8bit", "lars8bit")
REFERENCE_CANDIDATE = "torch-fused"


def gpt2_small_shapes(layers: int = 12, vocab: int = 50257, width: int = 768, positions: int = 1024) -> list[tuple]:
    """Parameter shapes of GPT-2 small (the LM head is tied to the token embedding)."""
    shapes: list[tuple] = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    shapes += [(width,), (width,)]
    return shapes


def counted_bytes_per_element(element_size: int, state_values: int, state_bytes: int) -> int:
    """Minimum traffic of one element's update: parameter read + write, gradient read, and each
    state value read + written."""
    return 3 * element_size + 2 * state_values * state_bytes


@dataclasses.dataclass
class Candidate:
    """An optimizer under test: how to build it and how many bytes its step must move."""

    name: str
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    state_values: int  # per-element state values (AdamW: 2)
    eight_bit: Callable[[torch.Tensor], bool]  # which parameters get 8-bit state

    def counted_bytes(self, params: Sequence[torch.Tensor]) -> int:
        total = 0
        for p in params:
            state_bytes = 1 if self.eight_bit(p) else 4
            total += p.numel() * counted_bytes_per_element(p.element_size(), self.state_values, state_bytes)
        return total


@dataclasses.dataclass
class Result:
    case: str
    optimizer: str
    numel: int
    ms_per_step: float
    min_ms: float
    ns_per_param: float
    gb_per_s: float
    ratio_vs_torch_fused: float | None = None
    note: str = ""


def _never(_: torch.Tensor) -> bool:
    return False


def _pagedopt_candidate(short: str) -> Candidate:
    import pagedopt

    names = {n.lower(): n for n in pagedopt.optim.OPTIMIZER_NAMES}
    cls = pagedopt.optim.get_optimizer_class(names[short])
    kwargs: dict = {"lr": 1e-4}
    if short.startswith(("sgd", "lars")):
        kwargs["momentum"] = 0.9
    probe = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    kind = probe.kind
    values = kind.num_states + kind.state1_moments - 1
    eight_bit = (lambda p: p.numel() >= 4096) if short.endswith("8bit") else _never
    return Candidate(f"pagedopt-{short}", lambda params: cls(params, **kwargs), values, eight_bit)


def _torch_candidate(name: str) -> Candidate:
    flag = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True}}[name]
    return Candidate(name, lambda params: torch.optim.AdamW(params, lr=1e-4, **flag), 2, _never)


def _bnb_candidate() -> Candidate:
    import bitsandbytes as bnb  # noqa: F401  (ImportError: not installed)

    return Candidate("bnb-adamw8bit", lambda params: bnb.optim.AdamW8bit(params, lr=1e-4), 2,
                     lambda p: p.numel() >= 4096)


def _torchao_candidate() -> Candidate:
    from torchao.optim import AdamW8bit

    # torchao keeps 8-bit state for tensors of >= 4096 elements that split into 256-blocks
    return Candidate("torchao-adamw8bit", lambda params: AdamW8bit(params, lr=1e-4), 2,
                     lambda p: p.numel() >= 4096 and p.numel() % 256 == 0)


def make_candidate(name: str) -> Candidate:
    """The candidate called ``name``; ImportError when its library is missing."""
    if name.startswith("pagedopt-"):
        short = name[len("pagedopt-"):]
        if short not in PAGEDOPT_8BIT and short != "adamw32bit" and not short.endswith("32bit"):
            raise ValueError(f"unknown pagedopt optimizer {name!r}")
        return _pagedopt_candidate(short)
    if name in ("torch-fused", "torch-foreach"):
        return _torch_candidate(name)
    if name == "bnb-adamw8bit":
        return _bnb_candidate()
    if name == "torchao-adamw8bit":
        return _torchao_candidate()
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(known_optimizers())}")


def known_optimizers() -> list[str]:
    return [*DEFAULT_OPTIMIZERS, *(f"pagedopt-{n}" for n in PAGEDOPT_8BIT if n != "adamw8bit")]


def resolve_optimizers(spec: str) -> list[str]:
    """Comma-separated names; ``default`` and ``all-8bit`` (pagedopt's 8-bit optimizers) expand."""
    names: list[str] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if part == "default":
            names += DEFAULT_OPTIMIZERS
        elif part == "all-8bit":
            names += [f"pagedopt-{n}" for n in PAGEDOPT_8BIT]
        else:
            names.append(part)
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def case_shapes(case: str, numel: int, layers: int) -> list[tuple]:
    if case == "a":
        return [(numel,)]
    if case == "b":
        return gpt2_small_shapes(layers=layers)
    raise ValueError(f"unknown case {case!r}; expected 'a' or 'b'")


CASE_TITLES = {"a": "one fp32 tensor", "b": "GPT-2-small parameter list"}


def _make_params(shapes: Sequence[tuple], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def run_case(case: str, shapes: Sequence[tuple], names: Sequence[str], repeats: int, warmup: int,
             log: Callable[[str], None] = print) -> list[Result]:
    """Time every available candidate on one parameter set, interleaved; medians per candidate."""
    params = _make_params(shapes)
    numel = sum(p.numel() for p in params)
    built: list[tuple[Candidate, torch.optim.Optimizer]] = []
    results: list[Result] = []
    for name in names:
        try:
            cand = make_candidate(name)
        except ImportError as e:
            log(f"  {name}: skipped ({type(e).__name__}: {e})")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cand.build(params)
            started = time.perf_counter()
            for _ in range(warmup):  # creates state; torchao compiles its step here
                opt.step()
        log(f"  {name}: ready ({warmup} warm-up steps, {time.perf_counter() - started:.1f} s)")
        built.append((cand, opt))
    times: dict[str, list[float]] = {c.name: [] for c, _ in built}
    for r in range(repeats):
        order = built[r % len(built):] + built[: r % len(built)] if built else []
        for cand, opt in order:
            started = time.perf_counter()
            opt.step()
            times[cand.name].append(time.perf_counter() - started)
    for cand, _ in built:
        median = statistics.median(times[cand.name])
        results.append(Result(
            case=case, optimizer=cand.name, numel=numel, ms_per_step=median * 1e3,
            min_ms=min(times[cand.name]) * 1e3, ns_per_param=median / numel * 1e9,
            gb_per_s=cand.counted_bytes(params) / median / 1e9,
        ))
    base = next((r for r in results if r.optimizer == REFERENCE_CANDIDATE), None)
    for r in results:
        r.ratio_vs_torch_fused = r.ms_per_step / base.ms_per_step if base else None
    del built, params
    return results


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor() or "?"
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    from .backends import cpu as native
    from .functional import dispatch

    lib = native.library()
    info["pagedopt_cpu_backend"] = dispatch.backend_for(torch.device("cpu")).name
    info["pagedopt_native_build"] = lib.build_info if lib else f"unavailable: {native.unavailable_reason()}"
    info["pagedopt_cpu_isa"] = lib.isa if lib else None
    for mod in ("bitsandbytes", "torchao"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def format_table(results: Sequence[Result]) -> str:
    header = f"{'case':<5} {'optimizer':<26} {'ms/step':>10} {'ns/param':>9} {'GB/s':>7} {'vs torch fused':>15}"
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = f"{r.ratio_vs_torch_fused:.2f}x" if r.ratio_vs_torch_fused is not None else "-"
        lines.append(f"{r.case:<5} {r.optimizer:<26} {r.ms_per_step:>10.2f} {r.ns_per_param:>9.3f} "
                     f"{r.gb_per_s:>7.1f} {ratio:>15}")
    return "\n".join(lines)


def run(cases: Sequence[str], optimizers: Sequence[str], repeats: int, warmup: int, numel: int, layers: int,
        json_path: str | None = None, log: Callable[[str], None] = print) -> list[Result]:
    """Run the benchmark and print the table (and write JSON when asked)."""
    info = machine_info()
    log(f"machine: {info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']} on {info['torch_threads']} "
        f"threads, load average {info.get('load_average')}")
    log(f"pagedopt CPU backend: {info['pagedopt_cpu_backend']} at level {info['pagedopt_cpu_isa']} "
        f"({info['pagedopt_native_build']})")
    results: list[Result] = []
    for case in cases:
        shapes = case_shapes(case, numel, layers)
        total = sum(math.prod(s) for s in shapes)
        log(f"case {case}: {CASE_TITLES[case]}, {len(shapes)} tensors, {total / 1e6:.1f}M parameters")
        results += run_case(case, shapes, optimizers, repeats, warmup, log)
    log("")
    log(format_table(results))
    if json_path:
        payload = {"machine": info, "command": ["pagedopt", *sys.argv[1:]], "repeats": repeats, "warmup": warmup,
                   "results": [dataclasses.asdict(r) for r in results]}
        from .fileio import atomic_write_text

        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
        log(f"wrote {json_path}")
    return results
