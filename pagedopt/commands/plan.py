"""``pagedopt plan``: how much memory each optimizer/paging choice needs per rank, and a config.

``pagedopt plan --params 7e9 --gpu-memory 80GiB --world-size 8 [--fsdp] [--optimizer AdamW]``
(or ``--model config.json`` with a Hugging Face-style model config, or a preset name such as
``gpt2-350m``) prints parameters, gradients and optimizer state per rank, the device-resident
and host-resident state of each paging policy, whether it fits, and the recommended choice.
``--json`` prints ``{"options": [{"optimizer", "paging", "per_rank_bytes": {"parameters",
"gradients", "optimizer_state", "total"}, "fits", ...}], "recommended": <index>}``;
``--write FILE`` writes the recommended config (YAML for ``.yaml``/``.yml``, else JSON), which
``pagedopt config check`` accepts. Exit status: 0 when the recommendation fits, 1 when
nothing fits, 2 on bad usage. Estimates: see :mod:`pagedopt.paging.estimate`.

Example:
    >>> from pagedopt.cli import main
    >>> main(["plan", "--params", "7e9", "--gpu-memory", "80GiB", "--world-size", "8", "--fsdp", "--json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan", help="estimate memory per rank for each optimizer/paging choice; write a config",
        description="Estimate parameters, gradients and optimizer state per rank for 32-bit, 8-bit and paged "
                    "8-bit optimizers under each paging policy; say what fits and write the recommended config.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", help="parameter count, e.g. 7e9 or 124000000 (as tensors of at most 2**26 "
                                       "elements, all with 8-bit state)")
    what.add_argument("--model", metavar="CONFIG",
                      help="a Hugging Face-style config.json (GPT-2 or Llama keys) or a preset: "
                           "gpt2-124m, gpt2-350m, gpt2-774m, gpt-1.3b")
    parser.add_argument("--gpu-memory", required=True, help="memory per GPU, e.g. 80GiB, 24GB")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in the job")
    parser.add_argument("--fsdp", action="store_true", help="parameters, gradients and state sharded over ranks")
    parser.add_argument("--optimizer", default="AdamW", help="algorithm family: AdamW, Adam, Lion, AdEMAMix, ...")
    parser.add_argument("--param-dtype", default="fp32", help="parameter and gradient dtype: fp32, bf16, fp16")
    parser.add_argument("--activation-memory", default="0", help="bytes per rank reserved for activations")
    parser.add_argument("--headroom", type=float, default=0.05,
                        help="fraction of GPU memory kept free (becomes memory.target_free_bytes)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--write", metavar="FILE", help="write the recommended config file")
    parser.set_defaults(func=run)


def _numels(args: argparse.Namespace) -> list[int]:
    from ..paging.estimate import numels_from_hf_config

    if args.params is not None:
        try:
            count = float(args.params)
        except ValueError:
            raise ValueError(f"--params {args.params!r} is not a number (examples: 7e9, 124000000)") from None
        if count < 0 or count != int(count):
            raise ValueError(f"--params {args.params!r} must be a whole, non-negative number")
        return _split(int(count))
    from ..train.presets import PRESETS, preset_numels

    if args.model in PRESETS:
        return preset_numels(args.model)
    path = Path(args.model)
    if not path.is_file():
        raise ValueError(f"--model {args.model!r}: no such file, and not a preset ({', '.join(PRESETS)})")
    if path.stat().st_size > 1 << 20:
        raise ValueError(f"--model {args.model}: a model config over 1 MiB is not a config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--model {args.model}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {args.model}: expected a JSON object")
    return numels_from_hf_config(cfg)


# With --params only, tensor sizes are unknown: assume tensors of at most 2**26 elements
# (a 7B model's largest matrices have ~2**27; most are smaller). Offload's stream window
# depends on the largest tensor; --model gives the real sizes.
PARAMS_TENSOR_NUMEL = 2**26


def _split(count: int) -> list[int]:
    full, rest = divmod(count, PARAMS_TENSOR_NUMEL)
    return [PARAMS_TENSOR_NUMEL] * full + ([rest] if rest else [])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(result: Any) -> str:
    lines = [
        f"{result.inputs['params']:,} parameters in {result.inputs['tensors']} tensors; per rank "
        f"(world size {result.inputs['world_size']}{', FSDP' if result.inputs['fsdp'] else ''}), GiB; "
        f"usable {_gib(result.usable_bytes)} of {_gib(result.inputs['gpu_memory'])}",
        "",
        f"{'':2}{'optimizer':<18}{'paging':<11}{'params':>9}{'grads':>9}{'state':>9}{'on GPU':>9}{'on host':>9}"
        f"{'total':>9}  fits",
    ]
    for i, o in enumerate(result.options):
        mark = "->" if i == result.recommended else ""
        lines.append(
            f"{mark:<2}{o.optimizer:<18}{o.paging:<11}{_gib(o.parameters):>9}{_gib(o.gradients):>9}"
            f"{_gib(o.optimizer_state):>9}{_gib(o.resident_state):>9}{_gib(o.optimizer_state - o.resident_state):>9}"
            f"{_gib(o.total):>9}  {'yes' if o.fits else 'no'}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_text
    from ..paging.config import parse_bytes
    from ..paging.estimate import config_for, plan

    try:
        numels = _numels(args)
        gpu_memory = int(parse_bytes(args.gpu_memory))
        activations = int(parse_bytes(args.activation_memory))
        if not 0.0 <= args.headroom < 1.0:
            raise ValueError(f"--headroom {args.headroom}: must be in [0, 1)")
        result = plan(numels, gpu_memory, args.world_size, args.fsdp, args.optimizer, args.param_dtype,
                      activations, args.headroom)
    except ValueError as e:
        print(f"pagedopt plan: {e}", file=sys.stderr)
        return 2
    best = result.options[result.recommended]
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(table(result))
        print(f"\nrecommended: {best.optimizer}, paging {best.paging}" + ("" if best.fits else " (does NOT fit)"))
    if args.write:
        doc = config_for(best, result)
        if args.write.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(doc, sort_keys=False)
        else:
            text = json.dumps(doc, indent=2) + "\n"
        atomic_write_text(args.write, text)
        if not args.json:
            print(f"wrote {args.write}")
    return 0 if best.fits else 1
