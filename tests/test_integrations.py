"""Every snippet of docs/integrations.md runs (CPU, tiny models), each in a fresh process.

A snippet is the ```python block after a ``<!-- snippet: NAME requires: MODULE -->`` line;
``launch: torchrun`` runs it on two gloo processes. Snippets whose framework is not
installed skip with the reason; the test fails if the page and this table drift apart.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "integrations.md"
_SNIPPET = re.compile(r"<!-- snippet: (\S+) requires: (\S+)(?: launch: (\S+))? -->\n```python\n(.*?)```", re.S)

# What each snippet must print (beyond exiting 0), so a snippet that silently does nothing fails.
EXPECTED = {
    "hf_trainer_optimizers": "8bit-blockwise",
    "hf_trainer_cls_and_kwargs": "AdamW8bit",
    "accelerate": "loss=",
    "lightning": "global_step=3",
    "torchrun_fsdp2": "world_size=2",
}


def _snippets() -> dict[str, tuple[str, str | None, str]]:
    return {name: (module, launch, code) for name, module, launch, code in _SNIPPET.findall(PAGE.read_text())}


def test_every_snippet_has_an_expectation():
    assert set(_snippets()) == set(EXPECTED)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_runs(name, tmp_path):
    module, launch, code = _snippets()[name]
    if not _installed(module):
        pytest.skip(f"{module} is not installed (the {name} snippet needs it; pagedopt does not depend on it)")
    script = tmp_path / f"snippet_{name}.py"  # not "{name}.py": it would shadow the framework
    script.write_text(code)
    if launch == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    else:
        command = [sys.executable, str(script)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert EXPECTED[name] in result.stdout, result.stdout[-3000:]
