"""The runtime package must import without torch or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_no_torch_or_transformers():
    code = ("import sys, mpt_edge_runtime, mpt_edge_runtime.text; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
