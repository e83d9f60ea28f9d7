"""A copy of the repository as a newcomer (or a Hugging Face Space) gets it: the files git would hand out, nothing
built or installed beside them (no egg-info, no concepts/, no studio-data/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_repository(dest: Path) -> Path:
    """Copy the tracked files, and the new ones git does not ignore, into `dest`; returns `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not part of the copy
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest
