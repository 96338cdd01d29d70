"""The hand-written stubs (python/kmm/_kmm.pyi) match the compiled module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_stubtest_agrees_with_the_binding():
    allow = Path(__file__).parent / "stubtest-allowlist.txt"
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kmm._kmm", "--allowlist", str(allow)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
