"""Each metric against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from planner import metrics


def test_psnr_of_a_constant_offset_is_20_db():
    ref = torch.zeros(2, 1, 8, 8)
    out = ref + 0.1  # MSE 0.01 -> 10 * log10(1 / 0.01) = 20 dB
    assert metrics.psnr(out, ref) == pytest.approx(20.0, abs=1e-5)
    assert metrics.mse(out, ref) == pytest.approx(0.01)


def test_psnr_is_infinite_for_identical_images_and_pools_the_error_of_all_images():
    ref = torch.rand(4, 1, 8, 8)
    assert metrics.psnr(ref.clone(), ref) == math.inf
    out = ref.clone()
    out[1] += 0.01  # only image 1 differs: 40 dB on its own, MSE 1e-4 / 4 over the batch
    assert metrics.psnr(out, ref) == pytest.approx(40.0 + 10 * math.log10(4), abs=1e-4)


def test_one_diverging_image_shows_in_the_pooled_worst_and_percentile_psnr_not_in_the_mean():
    ref = torch.zeros(20, 1, 8, 8)
    out = ref + 0.001  # 60 dB each
    out[7] = 0.1  # one image at 20 dB
    summary = metrics.psnr_summary(out, ref)
    pooled_mse = (19 * 1e-6 + 1e-2) / 20
    assert summary["psnr"] == pytest.approx(10 * math.log10(1 / pooled_mse), abs=1e-6)  # about 33 dB
    assert summary["psnr_mean"] == pytest.approx((19 * 60 + 20) / 20, abs=1e-6)  # 58 dB: the outlier hides
    assert summary["psnr_worst"] == pytest.approx(20.0, abs=1e-6)
    assert 20.0 <= summary["psnr_p5"] < 60.0
    exact = metrics.psnr_summary(ref.clone(), ref)
    assert exact["psnr"] == math.inf and exact["psnr_mean"] == metrics.PSNR_CEILING_DB
    # the same summary from the images' errors alone (what a benchmark keeps to score subsets later)
    from_errors = metrics.psnr_summary_of(metrics.per_image_mse(out, ref))
    assert from_errors == pytest.approx(summary) and metrics.psnr_summary_of(torch.zeros(3))["psnr"] == math.inf


def test_the_pooled_psnr_interval_is_wide_where_one_image_decides_it_and_a_point_where_none_does():
    ref = torch.zeros(40, 1, 8, 8)
    even = metrics.psnr_summary(ref + 0.01, ref)  # every image at 40 dB: any draw pools to 40 dB
    assert [even["psnr_lo"], even["psnr_hi"]] == pytest.approx([40.0, 40.0], abs=1e-6)
    out = ref + 0.001
    out[3] = 0.1  # one image at 20 dB among 60 dB ones decides the pooled PSNR (about 36 dB)
    summary = metrics.psnr_summary(out, ref)
    lo, hi = summary["psnr_lo"], summary["psnr_hi"]
    assert lo < summary["psnr"] < hi and hi - lo > 5  # draws without it pool far higher, with two far lower
    assert hi <= 60.0 + 1e-6 and lo > 20.0
    assert metrics.pooled_psnr_interval(metrics.per_image_mse(out, ref)) == (lo, hi)  # seeded: the same twice
    # a wider level covers more; an all-exact draw is infinite, not NaN
    wide = metrics.pooled_psnr_interval(metrics.per_image_mse(out, ref), level=0.99)
    assert wide[0] <= lo and wide[1] >= hi
    exact = metrics.psnr_summary(ref.clone(), ref)
    assert exact["psnr_lo"] == exact["psnr_hi"] == math.inf
    with pytest.raises(ValueError, match="no images"):
        metrics.pooled_psnr_interval(torch.zeros(0))


def test_the_paired_difference_sees_through_inputs_that_vary_under_both_runs():
    # inputs that differ by three orders of magnitude in how far off they go, under both runs alike: each
    # run's own interval is wide; one run halves every input's error: 3 dB better in every draw
    both = torch.logspace(-7, -4, 40, dtype=torch.float64)
    better = both / 2
    paired = metrics.paired_psnr_difference(better, both)
    assert paired["difference"] == pytest.approx(10 * math.log10(2))
    lo, hi = paired["interval"]
    assert lo == pytest.approx(10 * math.log10(2)) and hi == pytest.approx(lo) and paired["level"] == 0.9
    own = metrics.pooled_psnr_interval(better)
    assert own[1] - own[0] > 3  # unpaired, the two runs' intervals would overlap
    uneven = better.clone()
    uneven[-1] = both[-1] * 4  # worse on the input that weighs most, better on the rest: the interval spans 0
    paired = metrics.paired_psnr_difference(uneven, both)
    assert paired["interval"][0] < paired["difference"] < 0 < paired["interval"][1]
    flipped = metrics.paired_psnr_difference(both, uneven)
    assert flipped["interval"] == pytest.approx([-paired["interval"][1], -paired["interval"][0]])
    exact = metrics.paired_psnr_difference(torch.zeros(4), torch.zeros(4))
    assert exact["difference"] == 0.0 and exact["interval"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="different lengths"):
        metrics.paired_psnr_difference(torch.zeros(4), torch.zeros(5))


def test_rel_l1_by_hand():
    ref = torch.tensor([1.0, -2.0, 3.0, -4.0])
    out = torch.tensor([1.5, -2.0, 2.0, -4.0])  # mean|diff| = 1.5/4, mean|ref| = 10/4
    assert metrics.rel_l1(out, ref) == pytest.approx(0.15)
    assert metrics.rel_l1(ref, ref) == 0.0


def test_the_typical_error_is_the_geometric_mean_of_the_samples_own():
    ref = torch.ones(3, 1, 2, 2)
    out = ref + torch.tensor([0.1, 0.4, 0.0]).reshape(3, 1, 1, 1)  # per-sample relative L1 0.1, 0.4, 0
    assert metrics.per_sample_rel_l1(out, ref).tolist() == pytest.approx([0.1, 0.4, 0.0])
    assert metrics.typical_rel_l1(out[:2], ref[:2]) == pytest.approx(0.2)  # sqrt(0.1 * 0.4); pooled: 0.25
    # one sample far off moves the pooled error with its size, the typical error only with its share
    far = out[:2].clone()
    far[1] = 101.0
    assert metrics.rel_l1(far, ref[:2]) > 40 and metrics.typical_rel_l1(far, ref[:2]) == pytest.approx(10 ** 0.5)
    # an exact sample counts as the floor, not as log(0)
    assert metrics.typical_rel_l1(ref, ref) == pytest.approx(metrics.TYPICAL_FLOOR)
    assert 0 < metrics.typical_rel_l1(out, ref) < 1e-3


def test_ssim_with_a_global_uniform_window_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = (x * 0.7 + 0.1 * torch.rand(1, 1, 5, 5, generator=gen, dtype=torch.float64)).clamp(0, 1)
    a, b = x.flatten().numpy(), y.flatten().numpy()
    mx, my = a.mean(), b.mean()
    vx, vy = a.var(), b.var()  # population statistics: a uniform window's weights sum to 1
    cov = ((a - mx) * (b - my)).mean()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(y, x, window=5, sigma=None) == pytest.approx(expected, rel=1e-9)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.ssim(1 - x, x) < 0.5


def test_frechet_distance_of_two_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 2))
    b = rng.standard_normal((4000, 2))
    # Whiten both samples exactly so their means and covariances are what we set.
    a = (a - a.mean(0)) / a.std(0, ddof=1)
    b = (b - b.mean(0)) / b.std(0, ddof=1)
    b = b @ np.diag([2.0, 3.0]) + np.array([1.0, -1.0])
    # |mu|^2 = 2; tr(I + diag(4, 9) - 2 diag(2, 3)) = 2 + 13 - 10 = 5 (plus tiny off-diagonal terms)
    assert metrics.frechet_distance(a, b) == pytest.approx(7.0, abs=0.05)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_a_video_is_one_sample_of_the_psnr():
    ref = torch.zeros(1, 3, 2, 4, 4)
    out = ref.clone()
    out[:, :, 1] += 0.1  # frame 1 is off by 0.1, frame 0 is exact: MSE 0.005 over the video
    assert metrics.psnr(out, ref) == pytest.approx(10 * math.log10(200))
    assert metrics.per_image_psnr(out, ref).shape == (1,)


def test_classifier_reads_real_held_out_digits():
    from planner.zoo.classifier import split_digits

    _, _, x_test, y_test = split_digits()
    assert metrics.digit_accuracy(x_test, y_test) >= 0.97
    # Real digits are close to themselves and far from noise in feature space.
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.digit_frechet_distance(x_test) < metrics.digit_frechet_distance(noise) / 5
