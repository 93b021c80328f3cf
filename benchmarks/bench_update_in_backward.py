"""Peak memory of a training step with and without update-in-backward (issue 14 item 2).

Each mode runs in its own process: build an MLP of ``--layers`` square ``--width`` Linear
layers, take two warm-up steps (state created), reset the peak resident set size, then
take ``--steps`` steps and report the peak growth over the memory held before the step
(parameters + optimizer state), read from the kernel (``VmHWM`` after resetting it via
``/proc/self/clear_refs``; Linux only). The gradients of all parameters are alive at once
in the ordinary step; in backward each is freed right after its update. On CUDA
(``--device cuda``) torch's ``max_memory_allocated`` is used instead.

Example:
    python benchmarks/bench_update_in_backward.py --layers 8 --width 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> dict:
    import torch

    import pagedopt

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(device)
    opt = pagedopt.AdamW8bit(model.parameters(), update_in_backward=args.mode == "in_backward")
    x = torch.randn(args.batch, args.width, device=device)

    def step():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset VmHWM to the current RSS
    for _ in range(args.steps):
        step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm("VmHWM")
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": args.mode, "before_bytes": before, "peak_bytes": peak, "peak_growth_bytes": peak - before,
            "gradient_bytes": grad_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", choices=["ordinary", "in_backward"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for mode in ("ordinary", "in_backward"):
        cmd = [sys.executable, __file__, "--mode", mode, "--layers", str(args.layers), "--width", str(args.width),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 1 << 20
    for r in rows:
        print(f"{r['mode']:>12}: peak growth during the step {r['peak_growth_bytes'] / mib:8.1f} MiB "
              f"(gradients {r['gradient_bytes'] / mib:.1f} MiB)")
    drop = rows[0]["peak_growth_bytes"] - rows[1]["peak_growth_bytes"]
    print(f"peak drop: {drop / mib:.1f} MiB = {drop / rows[0]['gradient_bytes']:.2f}x the gradient bytes")
    if args.json:
        from pagedopt.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"benchmark": "update_in_backward", "device": args.device,
                                                 "rows": rows, "peak_drop_bytes": drop}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
