"""Training fixtures: a folder of small concept pictures, shared by the trainer, resume and memory tests."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def pictures(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[8:40, 8:40] = (200, 40 + 20 * k, 40)
        arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{k}.png")
    return folder
