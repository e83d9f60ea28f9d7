"""The paper's trade-off chart: one point per variant where its scores say, references drawn, bad input refused."""

import numpy as np
import pytest
from PIL import Image

from studio.evaluation.chart import draw_tradeoff, tradeoff_points


def _est(mean, half=0.05):
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 10}


def test_each_variant_is_drawn_where_its_scores_put_it(tmp_path):
    rows = {"ti": {"identity": _est(0.3), "prompt_fidelity": _est(0.8)},
            "xti": {"identity": _est(0.6), "prompt_fidelity": _est(0.4)}}
    points = tradeoff_points(rows, plain={"identity": _est(0.1), "prompt_fidelity": _est(0.9)},
                             ceiling=_est(0.9, 0.02))
    assert [p.name for p in points] == ["ti", "xti", "plain words", "real pictures"]
    path = draw_tradeoff(points, tmp_path / "chart.png", title="test")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue, red = np.array([0x1F, 0x77, 0xB4]), np.array([0xD6, 0x27, 0x28])
    ys_blue, xs_blue = np.nonzero((np.abs(picture - blue).sum(-1) < 30))
    ys_red, xs_red = np.nonzero((np.abs(picture - red).sum(-1) < 30))
    assert xs_blue.size and xs_red.size
    # ti: more editable (right), less faithful (lower) than xti
    assert np.median(xs_blue) > np.median(xs_red) and np.median(ys_blue) > np.median(ys_red)


def test_nothing_to_draw_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no variant"):
        draw_tradeoff(tradeoff_points({"ti": {"identity": _est(0.3)}}), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
