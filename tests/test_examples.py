"""Every example runs on the embedded model as a user would run it (a smoke test: it finishes and prints
what it says it prints; how long it takes is measured by the benchmarks, not asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "quickstart.py": "tokens prefilled",
    "checkpoint_and_fork.py": "original context unchanged: True",
    "langchain_chain.py": "reused",
    "llamaindex_long_document.py": "loaded back in",
    "agent_checkpoint.py": "run 2:",
}


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_runs(example):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[example] in done.stdout, done.stdout[-2000:]
