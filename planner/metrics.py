"""Quality of a cached run against the uncached reference from the same seeds.

Images are ``[B, C, H, W]`` (video ``[B, C, F, H, W]``: SSIM folds it into frames, the PSNRs take a
whole video as one sample) with values in ``[0, data_range]``.

The headline PSNR is *pooled*: from the mean squared error over every pixel of every image, so one
sample that drifts far off pulls it down as much as its error weighs; a bootstrap interval over the
images says how much that makes it depend on which inputs were drawn. Beside it stand the mean of
the per-image PSNRs (which a few near-perfect images can flatter), the worst image and the 5th
percentile. For the digit models there are also the digit classifier's accuracy and a Frechet
distance between classifier features of generated and real digits (an FID on our own feature
extractor).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _as_images(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.dim() == 5:  # [B, C, F, H, W] -> [B*F, C, H, W]
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], x.shape[3], x.shape[4])
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W] or videos [B, C, F, H, W], got shape {tuple(x.shape)}")
    return x


def mse(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    return F.mse_loss(_as_images(output), _as_images(reference)).item()


def rel_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L1 error ``mean|output - reference| / mean|reference|`` (0 for identical inputs)."""
    out, ref = torch.as_tensor(output).double(), torch.as_tensor(reference).double()
    denom = ref.abs().mean().item()
    diff = (out - ref).abs().mean().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def per_sample_rel_l1(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's (leading dimension) relative L1 error ``mean|output - reference| / mean|reference|``."""
    out, ref = torch.as_tensor(output).double(), torch.as_tensor(reference).double()
    diff, scale = (out - ref).abs().flatten(1).mean(1), ref.abs().flatten(1).mean(1)
    return torch.where(diff == 0, 0.0, diff / scale)


# A sample that matches its reference exactly counts as this relative error in the typical error, where
# its log (minus infinity) would make every plan's typical error zero.
TYPICAL_FLOOR = 1e-12


def typical_rel_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """The error of a typical sample: the geometric mean of the per-sample relative L1 errors
    (:func:`per_sample_rel_l1`). Unlike :func:`rel_l1`, pooled over all samples, it moves with one sample
    that drifts far off no more than with any other."""
    errors = per_sample_rel_l1(output, reference).clamp_min(TYPICAL_FLOOR)
    return errors.log().mean().exp().item()


# An image that matches its reference exactly counts as this many dB in the per-image statistics,
# where an infinity would swamp a mean; the pooled PSNR needs no such cap.
PSNR_CEILING_DB = 100.0


def _db(mse_value: torch.Tensor | float, data_range: float) -> torch.Tensor:
    return 10 * torch.log10(data_range**2 / torch.as_tensor(mse_value, dtype=torch.float64))


def _pooled_db(per_image_mse: torch.Tensor, data_range: float) -> torch.Tensor:
    """The pooled PSNR of images of one size from their MSEs (their mean is the pooled MSE); inf when all are exact."""
    return _db(torch.as_tensor(per_image_mse, dtype=torch.float64).mean(), data_range)


def per_image_mse(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean squared error of each sample (leading dimension; a video is one sample)."""
    out, ref = torch.as_tensor(output).double(), torch.as_tensor(reference).double()
    return ((out - ref) ** 2).flatten(1).mean(1)


def per_image_psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each sample (a video is one sample), capped at :data:`PSNR_CEILING_DB`."""
    return _db(per_image_mse(output, reference), data_range).clamp(max=PSNR_CEILING_DB)


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Pooled peak signal-to-noise ratio in dB: from the MSE over all pixels of all images; ``inf`` when
    every image matches exactly."""
    error = mse(output, reference)
    return math.inf if error == 0 else _db(error, data_range).item()


# The share of bootstrap resamples the interval of the pooled PSNR covers, and how many resamples it takes.
PSNR_INTERVAL_LEVEL = 0.9
PSNR_INTERVAL_RESAMPLES = 2000


def bootstrap_pooled_psnr(errors: list[torch.Tensor], data_range: float = 1.0, *,
                          resamples: int = PSNR_INTERVAL_RESAMPLES, seed: int = 0) -> list[torch.Tensor]:
    """For each vector of per-image MSEs in ``errors`` (the same images, in the same order), the pooled PSNR
    of ``resamples`` draws of the images with replacement: the same draws for every vector, so that two
    plans run on the same inputs are compared image for image. Seeded: the same MSEs give the same draws."""
    errors = [torch.as_tensor(e, dtype=torch.float64).flatten() for e in errors]
    n = errors[0].numel()
    if n == 0:
        raise ValueError("no images to bootstrap")
    if any(e.numel() != n for e in errors):
        raise ValueError(f"per-image errors of different lengths: {[e.numel() for e in errors]}")
    generator = torch.Generator().manual_seed(seed)
    chunk = 256  # resamples drawn at once: thousands of images need no resamples x images index in memory
    draws = [torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
             for start in range(0, resamples, chunk)]
    return [_db(torch.cat([e[d].mean(1) for d in draws]), data_range) for e in errors]  # an all-exact draw: inf


def middle_interval(values: torch.Tensor, level: float = PSNR_INTERVAL_LEVEL) -> tuple[float, float]:
    """The bounds of the middle ``level`` of ``values``, at the nearest ranks (inf - inf would make an
    interpolated bound NaN)."""
    ranked, last = values.sort().values, values.numel() - 1
    tail = (1 - level) / 2
    return ranked[math.floor(tail * last)].item(), ranked[math.ceil((1 - tail) * last)].item()


def pooled_psnr_interval(per_image_mse: torch.Tensor, data_range: float = 1.0, *, level: float = PSNR_INTERVAL_LEVEL,
                         resamples: int = PSNR_INTERVAL_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the pooled PSNR over images: the images (with their MSEs
    ``per_image_mse``, all of one size) are drawn with replacement ``resamples`` times and the pooled PSNR
    of each draw taken; the interval spans the middle ``level`` of those. It says how far another set of
    as many inputs could move the headline. When a rare image far off decides the pooled PSNR, the interval
    is wide where such an image was drawn, and cannot warn where none was."""
    return middle_interval(bootstrap_pooled_psnr([per_image_mse], data_range, resamples=resamples, seed=seed)[0], level)


def paired_psnr_difference(per_image_mse: torch.Tensor, other_mse: torch.Tensor, data_range: float = 1.0, *,
                           level: float = PSNR_INTERVAL_LEVEL, resamples: int = PSNR_INTERVAL_RESAMPLES,
                           seed: int = 0) -> dict[str, Any]:
    """How much higher the pooled PSNR of one run (``per_image_mse``) is than another's on the same inputs
    (``other_mse``, image for image): ``difference`` in dB and ``interval``, the middle ``level`` of that
    difference over bootstrap draws of the inputs, each draw the same images for both runs. Paired, it is
    far narrower than the two runs' own intervals where the runs go wrong on the same inputs. Draws where
    both runs match exactly count as no difference."""
    ours, theirs = bootstrap_pooled_psnr([per_image_mse, other_mse], data_range, resamples=resamples, seed=seed)
    pooled = [_pooled_db(e, data_range) for e in (per_image_mse, other_mse)]
    difference = torch.nan_to_num(pooled[0] - pooled[1], nan=0.0).item()
    lo, hi = middle_interval(torch.nan_to_num(ours - theirs, nan=0.0), level)
    return {"difference": difference, "interval": [lo, hi], "level": level}


def psnr_summary(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> dict[str, Any]:
    """``psnr`` (pooled, the headline) between ``psnr_lo`` and ``psnr_hi`` (its :func:`pooled_psnr_interval`),
    ``psnr_mean`` (mean of per-image PSNRs), ``psnr_p5`` (their 5th percentile) and ``psnr_worst`` (the lowest)."""
    return psnr_summary_of(per_image_mse(output, reference), data_range)


def psnr_summary_of(per_image_mse: torch.Tensor, data_range: float = 1.0) -> dict[str, Any]:
    """:func:`psnr_summary` from the images' MSEs (images of one size, so that their mean is the pooled MSE)."""
    errors = torch.as_tensor(per_image_mse, dtype=torch.float64).flatten()
    per_image = _db(errors, data_range).clamp(max=PSNR_CEILING_DB)
    return {
        "psnr": _pooled_db(errors, data_range).item(),
        **dict(zip(("psnr_lo", "psnr_hi"), pooled_psnr_interval(errors, data_range))),
        "psnr_mean": per_image.mean().item(),
        "psnr_p5": torch.quantile(per_image, 0.05).item(),
        "psnr_worst": per_image.min().item(),
    }


def _window(size: int, sigma: float | None) -> torch.Tensor:
    if sigma is None:
        w = torch.ones(size, dtype=torch.float64)
    else:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        w = torch.exp(-(coords**2) / (2 * sigma**2))
    w = w / w.sum()
    return torch.outer(w, w)


def ssim(
    output: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    window: int = 7,
    sigma: float | None = 1.5,
) -> float:
    """Structural similarity (Wang et al. 2004), per image and channel then averaged; 1.0 for identical images.

    Local statistics use a Gaussian window (``sigma``; ``None`` means uniform) of ``window``
    pixels, shrunk to the image size for small images, over valid positions only.
    """
    out, ref = _as_images(output), _as_images(reference)
    b, c, h, w = out.shape
    size = min(window, h, w)
    kernel = _window(size, sigma).to(out).expand(c, 1, size, size)

    def filt(x):
        return F.conv2d(x, kernel, groups=c)

    mu_x, mu_y = filt(out), filt(ref)
    var_x = filt(out * out) - mu_x**2
    var_y = filt(ref * ref) - mu_y**2
    cov = filt(out * ref) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the formula of FID.
    """

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N>=2, D] of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix:
    # stable even when few samples make the covariances singular (where sqrtm of the product is not).
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def compare(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """The PSNRs of :func:`psnr_summary`, SSIM, MSE and relative L1 of ``output`` against ``reference``."""
    return {
        **psnr_summary(output, reference, data_range),
        "ssim": ssim(output, reference, data_range),
        "mse": mse(output, reference),
        "rel_l1": rel_l1(output, reference),
    }


# --- the digit models only: the classifier-based meters -------------------------------------------------


def digit_accuracy(images: torch.Tensor, labels) -> float:
    """Fraction of ``[B, 1, 8, 8]`` images in [0, 1] the shipped classifier reads as their intended label."""
    from planner.zoo.classifier import load_classifier

    predicted = load_classifier().predict(torch.as_tensor(images).float())
    return (predicted == torch.as_tensor(labels).long()).float().mean().item()


_REAL_FEATURES: np.ndarray | None = None


def real_digit_features() -> np.ndarray:
    """Classifier features of all 1797 real digits (computed once per process)."""
    global _REAL_FEATURES
    if _REAL_FEATURES is None:
        from planner.zoo.classifier import load_classifier
        from planner.zoo.digits import load_digits_data

        images, _ = load_digits_data()
        with torch.no_grad():
            _REAL_FEATURES = load_classifier().features((images + 1) / 2).numpy()
    return _REAL_FEATURES


def digit_frechet_distance(images: torch.Tensor) -> float:
    """Frechet distance between classifier features of generated digits and of the real digits."""
    from planner.zoo.classifier import load_classifier

    with torch.no_grad():
        features = load_classifier().features(torch.as_tensor(images).float()).numpy()
    return frechet_distance(features, real_digit_features())
