"""Maximum mean discrepancy between two token sets, as DALI computes it."""

from __future__ import annotations

import torch

# Multipliers of the base bandwidth: 2 ** [-2, -1, 0, 1, 2].
BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_loss(x: torch.Tensor, y: torch.Tensor, multipliers: tuple[float, ...] = BANDWIDTH_MULTIPLIERS) -> torch.Tensor:
    """Per-sample biased MMD^2 with a sum of RBF kernels, averaged over the batch.

    For sample b, pool Z = [x_b; y_b] ((N + M) x D), squared distances D2 = ||z_i - z_j||^2, base bandwidth
    h = sum(D2) / (n^2 - n) (the mean off-diagonal squared distance, detached), kernel
    K = sum_m exp(-D2 / (h * m)). MMD_b = mean(K_xx) - 2 mean(K_xy) + mean(K_yy): the V-statistic (diagonals
    included, not square-rooted). No pairs across samples.

    Args:
        x: [B, N, D] audio tokens.
        y: [B, M, D] image tokens.
    Returns:
        scalar tensor, mean over the batch of MMD_b.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"mmd_loss expects [B, N, D] and [B, M, D], got {list(x.shape)} and {list(y.shape)}")
    num_x = x.shape[1]
    pooled = torch.cat([x, y], dim=1).float()  # [B, n, D]
    n = pooled.shape[1]
    sq_dist = torch.cdist(pooled, pooled).square()  # [B, n, n]
    bandwidth = (sq_dist.detach().sum(dim=(1, 2)) / (n * n - n)).clamp_min(1e-12).view(-1, 1, 1)
    kernel = sum(torch.exp(-sq_dist / (bandwidth * m)) for m in multipliers)
    k_xx = kernel[:, :num_x, :num_x].mean(dim=(1, 2))
    k_xy = kernel[:, :num_x, num_x:].mean(dim=(1, 2))
    k_yy = kernel[:, num_x:, num_x:].mean(dim=(1, 2))
    return (k_xx - 2 * k_xy + k_yy).mean()
