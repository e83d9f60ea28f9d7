"""benchmarks/image_swap.py in miniature (tiny UNet, 10 library files, 3 requests): it finds the image concept in
the library, patches and restores the shared UNet (the script asserts both) and prints its last line in the form
docs/benchmarks.md quotes. The real run (SD 1.5 shapes, 10,000 files) is a command for a quiet machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_image_swap_benchmark_runs_and_reports_resolve_and_patch():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "image_swap.py"), "--size", "tiny",
                           "--library", "10", "--reps", "3"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"image concept swap ms at 10 files: resolve ([\d.]+) \+ patch (-?[\d.]+) = ([\d.]+); "
                         r"first use ([\d.]+)", last)
    assert found, last
    resolve, patch, total, _first = map(float, found.groups())
    assert resolve > 0 and abs(resolve + patch - total) < 0.002
