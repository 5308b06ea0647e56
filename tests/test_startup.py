"""The CLI answers introspection without importing torch or Lightning (they cost seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
sys.argv = ["effbench", *{args!r}]
from effbench.cli import _main  # main() itself ends the process (effbench.lifecycle.exit_now)
try:
    _main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "pytorch_lightning", "torchvision") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["--cfg", "job",
                                                                 "strategy=precomputed"],
                                  ["strategy=nosuch"]])
def test_no_torch_for_config_work(args: list[str], tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")]
    assert line == ["HEAVY: "], out.stdout[-2000:] + out.stderr[-2000:]
