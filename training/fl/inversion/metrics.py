"""How close a reconstruction is to the true record: SSIM, PSNR and Dice, implemented here
(no image library), as the "Metrics" section of :mod:`training.fl.inversion` defines them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: An exact copy has an infinite PSNR, which JSON cannot hold.
_PSNR_CAP = 100.0


# --- metrics -------------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two images ``[C, H, W]`` or ``[H, W]`` with values in ``[0, 1]``.

    Wang et al. (2004), 11x11 Gaussian window with sigma 1.5; for images under 11 pixels a side,
    the largest odd window that fits, same sigma (module docstring).
    """
    x = a.detach().to(torch.float64)
    y = b.detach().to(torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of one shape, got {list(x.shape)} and {list(y.shape)}")
    if x.dim() == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"ssim needs [C, H, W] or [H, W] images, got {list(a.shape)}")
    size = min(11, x.shape[1], x.shape[2])
    size -= 1 - size % 2  # odd
    window = _gaussian_window(size, 1.5).view(1, 1, size, size)
    c1, c2 = 0.01**2, 0.03**2
    xs, ys = x.unsqueeze(1), y.unsqueeze(1)  # channels as a batch: [C, 1, H, W]
    mu_x, mu_y = F.conv2d(xs, window), F.conv2d(ys, window)
    var_x = F.conv2d(xs * xs, window) - mu_x**2
    var_y = F.conv2d(ys * ys, window) - mu_y**2
    cov = F.conv2d(xs * ys, window) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """``10 log10(1 / MSE)`` for values in ``[0, 1]``, capped at 100 dB."""
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    if mse <= 10 ** (-_PSNR_CAP / 10):
        return _PSNR_CAP
    return 10.0 * math.log10(1.0 / mse)


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of two foreground masks (nonzero is foreground); 1.0 when both are empty."""
    p, t = pred.detach().bool(), target.detach().bool()
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / total
