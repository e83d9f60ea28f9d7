"""The bootstrap intervals every evaluation score carries: on data drawn from known distributions the 95% interval
covers the true mean about 95% of the time (where resampling pictures alone would not), it shrinks as subjects are
added, a paired margin of identical sides is exactly 0 ± 0, and the same seed gives the same interval."""

import numpy as np
import pytest

from studio.evaluation.stats import (Estimate, bootstrap_mean, hierarchical_bootstrap, paired_margin,
                                     point_estimate, ratio)


def nested(rng, subjects=8, prompts=4, pictures=3, mean=0.5, subject_sd=0.1, prompt_sd=0.05, picture_sd=0.1):
    """Scores with a random effect per subject and per prompt: pictures of one prompt are not independent."""
    out = []
    for _ in range(subjects):
        s = mean + rng.normal(0, subject_sd)
        out.append([list(s + rng.normal(0, prompt_sd) + rng.normal(0, picture_sd, pictures))
                    for _ in range(prompts)])
    return out


def test_the_interval_covers_the_true_mean_where_resampling_pictures_alone_does_not():
    """12 subjects (the full run's S): 183 of 200 intervals cover (a percentile bootstrap over few subjects is a
    little narrow); treating the 144 pictures as independent, 106 of 200."""
    rng = np.random.default_rng(0)
    covered, naive_covered, runs = 0, 0, 200
    for k in range(runs):
        data = nested(rng, subjects=12)
        est = hierarchical_bootstrap(data, resamples=200, seed=k)
        covered += est.low <= 0.5 <= est.high
        flat = bootstrap_mean([v for s in data for p in s for v in p], resamples=200, seed=k)
        naive_covered += flat.low <= 0.5 <= flat.high
    assert 0.88 <= covered / runs <= 0.99, covered / runs
    assert naive_covered / runs < 0.7, naive_covered / runs  # pictures treated as independent: far too narrow


def test_the_interval_shrinks_with_more_subjects_about_as_one_over_root_n():
    rng = np.random.default_rng(1)
    few = np.mean([hierarchical_bootstrap(nested(rng, subjects=8), 300, seed=k).half_width for k in range(12)])
    many = np.mean([hierarchical_bootstrap(nested(rng, subjects=32), 300, seed=k).half_width for k in range(12)])
    assert 0.35 < many / few < 0.65, (few, many)  # 1/sqrt(4) = 0.5


def test_a_paired_margin_of_identical_sides_is_zero_and_a_constant_shift_is_exact():
    rng = np.random.default_rng(2)
    a = nested(rng)
    same = paired_margin(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and same.n == 96
    shifted = paired_margin([[[v + 0.1 for v in p] for p in s] for s in a], a)
    assert shifted.mean == pytest.approx(0.1) and shifted.half_width == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="drawn alike"):
        paired_margin(a, a[:-1])


def test_subjects_and_prompts_weigh_the_same_whatever_their_number_of_pictures():
    data = [[[1.0, 2.0, 3.0]], [[4.0], [5.0, 6.0]]]  # subject means 2 and 5
    assert point_estimate(data) == pytest.approx(3.375)  # (2 + (4 + 5.5) / 2) / 2
    est = hierarchical_bootstrap(data)
    assert est.n == 6 and est.low <= est.mean <= est.high


def test_the_same_seed_gives_the_same_interval_and_the_printed_form_carries_n():
    rng = np.random.default_rng(3)
    data = nested(rng)
    assert hierarchical_bootstrap(data, seed=7) == hierarchical_bootstrap(data, seed=7)
    assert hierarchical_bootstrap(data, seed=7) != hierarchical_bootstrap(data, seed=8)
    assert str(Estimate(0.6213, 0.58, 0.66, 96)) == "0.62 ± 0.04 (n=96)"
    assert Estimate.from_dict(Estimate(0.6213, 0.58, 0.66, 96).as_dict()) == Estimate(0.6213, 0.58, 0.66, 96)


def test_a_ratio_resamples_subjects_jointly_and_bad_input_is_refused():
    rng = np.random.default_rng(4)
    a = nested(rng, mean=0.4)
    ceiling = [[[0.8, 0.8]] for _ in a]
    est = ratio(a, ceiling)
    assert est.mean == pytest.approx(point_estimate(a) / 0.8) and est.low < est.mean < est.high
    with pytest.raises(ValueError, match="no scores"):
        hierarchical_bootstrap([[[]], []])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([0.5, float("inf")])
