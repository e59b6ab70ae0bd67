"""Optimal transport between two token sets: exact EMD (as the original) or batched entropic OT."""

from __future__ import annotations

import atexit
import math
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

WEIGHT_SUM_TOLERANCE = 1e-4
# POT imports every array library it finds; JAX then reserves most of the GPU's memory at import. We only
# hand POT torch tensors and numpy arrays, so its other backends stay off.
for _library in ("JAX", "CUPY", "TENSORFLOW"):
    os.environ.setdefault(f"POT_BACKEND_DISABLE_{_library}", "1")


def squared_euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C[b, i, j] = ||x[b, i] - y[b, j]||^2 (POT's default 'sqeuclidean'), in float32 or wider.

    Args:
        x: [B, N, D], y: [B, M, D].
    Returns:
        [B, N, M], clamped at 0 (the expanded form can round below zero).
    """
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = y.to(x.dtype)
    cost = x.square().sum(-1, keepdim=True) + y.square().sum(-1).unsqueeze(1) - 2 * x @ y.transpose(1, 2)
    return cost.clamp_min(0.0)


def _check_weights(weights: torch.Tensor | None, batch: int, size: int, name: str, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((batch, size), 1.0 / size, dtype=like.dtype, device=like.device)
    if tuple(weights.shape) != (batch, size):
        raise ValueError(f"{name} must have shape [{batch}, {size}], got {list(weights.shape)}")
    detached = weights.detach()
    if not torch.isfinite(detached).all() or (detached < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    sums = detached.double().sum(-1)
    if ((sums - 1).abs() > WEIGHT_SUM_TOLERANCE).any():
        raise ValueError(f"{name} must sum to 1 per sample (got sums from {sums.min():.6f} to {sums.max():.6f})")
    return weights.to(like.dtype)


def ot_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    x_weights: torch.Tensor | None = None,
    y_weights: torch.Tensor | None = None,
    solver: str = "emd",
    reg: float = 0.05,
    max_iters: int = 200,
    tol: float = 1e-5,
    workers: int = 0,
) -> torch.Tensor:
    """Per-sample OT cost between token clouds under a squared-Euclidean cost, averaged over the batch.

    Args:
        x: [B, N, D] audio tokens; y: [B, M, D] image tokens.
        x_weights: [B, N] marginal of x (rows sum to 1); uniform 1/N when None.
        y_weights: [B, M] marginal of y; uniform 1/M when None.
        solver: "emd" — exact network-simplex EMD per sample through POT on the CPU (what the original
            ran); gradients: the optimal plan for the cost, centred duals for the weights.
            "sinkhorn" — batched log-domain entropic OT on the tokens' device. The value is the entropic
            dual objective <f, a> + <g, b>; its gradients come from the envelope theorem (plan for the
            cost, potentials for the weights), exact at convergence, without back-propagating through the
            iterations. ``reg`` is relative to the mean cost of each sample, so it is scale-free.
        max_iters, tol: Sinkhorn stops after ``max_iters`` or once the marginal error is below ``tol``.
        workers: with "emd", solve the batch's problems on this many CPU processes (0: one after another in
            this process, as the original).
    Returns:
        scalar: mean over the batch. A sample whose cost is not finite yields NaN (the original silently
        replaced it by 0); the training loop skips such steps and counts them.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"ot_loss expects [B, N, D] and [B, M, D], got {list(x.shape)} and {list(y.shape)}")
    cost = squared_euclidean_cost(x, y)
    batch, n, m = cost.shape
    a = _check_weights(x_weights, batch, n, "x_weights", cost)
    b = _check_weights(y_weights, batch, m, "y_weights", cost)
    if solver == "emd":
        if workers > 1:
            return emd_cost_parallel(cost, a, b, workers).mean()
        return torch.stack([emd_cost(cost[i], a[i], b[i]) for i in range(batch)]).mean()
    if solver == "sinkhorn":
        return sinkhorn_cost(cost, a, b, reg=reg, max_iters=max_iters, tol=tol).mean()
    raise ValueError(f"unknown OT solver '{solver}' (expected 'emd' or 'sinkhorn')")


def emd_cost(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact EMD of one problem through POT, differentiable w.r.t. cost and both marginals.

    Args:
        cost: [N, M]; a: [N]; b: [M] (each marginal sums to 1).
    Returns:
        0-dim tensor on cost's device; NaN when the cost is not finite.
    """
    import ot

    if not torch.isfinite(cost.detach()).all():
        return cost.sum() * float("nan")
    # POT solves in float64; renormalising there keeps its marginal check (6 decimals) from firing on
    # float32 rounding of weights that do sum to 1.
    a64, b64 = a.double(), b.double()
    a64, b64 = a64 / a64.detach().sum(), b64 / b64.detach().sum()
    value = ot.emd2(a64, b64, cost.double(), numItermax=1_000_000)
    return value.to(cost.dtype)


_POOLS: dict[int, ProcessPoolExecutor] = {}


class _SharedArray:
    """An array in named shared memory: the EMD workers read costs and write plans in place.

    Pickling a batch of cost matrices to the workers and the plans back (2 x 300 MB per step at the paper's
    sizes) cost more than solving them; shared memory leaves only the marginals and duals to pickle.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        from multiprocessing.shared_memory import SharedMemory

        self.shape, self.dtype = shape, np.dtype(dtype)
        self.memory = SharedMemory(create=True, size=max(1, math.prod(shape) * self.dtype.itemsize))
        self.array = np.ndarray(shape, dtype=self.dtype, buffer=self.memory.buf)

    @property
    def name(self) -> str:
        return self.memory.name

    def release(self) -> None:
        self.array = None
        self.memory.close()
        self.memory.unlink()


_SHARED: dict[str, _SharedArray] = {}


def _shared_array(role: str, shape: tuple[int, ...], dtype: np.dtype) -> _SharedArray:
    """The parent's shared array for ``role`` ("cost" or "plan"), reused while shape and dtype hold."""
    current = _SHARED.get(role)
    if current is None or current.shape != shape or current.dtype != dtype:
        if current is not None:
            current.release()
        if not _SHARED:
            atexit.register(_release_shared)
        _SHARED[role] = _SharedArray(shape, dtype)
    return _SHARED[role]


def _release_shared() -> None:
    for shared in _SHARED.values():
        shared.release()
    _SHARED.clear()


_ATTACHED: dict[str, tuple[object, np.ndarray]] = {}  # in each worker: shared arrays by name


def _attached(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    from multiprocessing.shared_memory import SharedMemory

    if name not in _ATTACHED:
        # Spawned workers share the parent's resource tracker, so attaching registers nothing new; the
        # parent unlinks the block (on a shape change and at exit).
        memory = SharedMemory(name=name)
        _ATTACHED[name] = (memory, np.ndarray(shape, dtype=dtype, buffer=memory.buf))
    return _ATTACHED[name][1]


def _solve_emd(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Worker: solve problem ``index`` of the shared cost batch, write its plan, return the duals (u, v)."""
    import ot

    cost_name, plan_name, shape, dtype, index, a, b = task
    for stale in set(_ATTACHED) - {cost_name, plan_name}:  # blocks the parent replaced (another shape)
        _ATTACHED.pop(stale)[0].close()
    cost = _attached(cost_name, shape, dtype)[index].astype(np.float64)  # POT's exact solver works in float64
    plan, log = ot.emd(a / a.sum(), b / b.sum(), cost, numItermax=1_000_000, log=True)
    _attached(plan_name, shape, dtype)[index] = plan
    return log["u"], log["v"]


def emd_cost_parallel(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, workers: int) -> torch.Tensor:
    """Exact EMD of each problem of a batch, solved on a pool of CPU processes: [B, N, M], [B, N], [B, M] -> [B].

    POT has no batched exact solver, so the problems are spread over processes, which read the costs from
    and write the plans to shared memory. Gradients are POT's own: the optimal plan for the cost, the
    centred dual potentials for the weights. Non-finite costs give NaN.
    """
    from dali.workers import worker_pool

    if workers not in _POOLS:  # spawned, not forked: the parent may hold CUDA state and threads
        _POOLS[workers] = worker_pool(workers, "spawn")
    shape = tuple(cost.shape)
    finite = torch.isfinite(cost.detach()).flatten(1).all(dim=1)
    # costs keep their precision (float32 in training; float64 stays exact), plans come back in it
    dtype = np.float64 if cost.dtype == torch.float64 else np.float32
    costs, plans = _shared_array("cost", shape, dtype), _shared_array("plan", shape, dtype)
    torch.from_numpy(costs.array).copy_(cost.detach())
    plans.array.fill(0.0)
    a64, b64 = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    solvable = [i for i in range(shape[0]) if finite[i]]
    tasks = [(costs.name, plans.name, shape, dtype, i, a64[i], b64[i]) for i in solvable]
    u, v = np.zeros(a64.shape), np.zeros(b64.shape)
    # one problem per task: solve times vary, and the arguments are small now that costs are shared
    for i, (u_i, v_i) in zip(solvable, _POOLS[workers].map(_solve_emd, tasks)):
        u[i], v[i] = u_i, v_i
    plan = torch.tensor(plans.array, dtype=cost.dtype, device=cost.device)  # a copy: the block is reused
    u, v = torch.from_numpy(u).to(cost), torch.from_numpy(v).to(cost)
    u, v = u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    value = (plan * cost).sum(dim=(1, 2)) + (u * (a - a.detach())).sum(-1) + (v * (b - b.detach())).sum(-1)
    return torch.where(finite, value, torch.full_like(value, math.nan))


def sinkhorn_iteration(
    log_kernel: torch.Tensor, g: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair of log-domain updates: f from g (rows), then g from f (columns); potentials divided by eps."""
    f = -torch.logsumexp(log_kernel + (g + log_b).unsqueeze(1), dim=2)
    g = -torch.logsumexp(log_kernel + (f + log_a).unsqueeze(2), dim=1)
    return f, g


_COMPILED_ITERATION = None


def _compiled_sinkhorn_iteration():
    """The iteration compiled once per process: each update becomes one fused pass over the [B, N, M] kernel
    instead of a broadcast sum written out and read back by logsumexp."""
    global _COMPILED_ITERATION
    if _COMPILED_ITERATION is None:
        _COMPILED_ITERATION = torch.compile(sinkhorn_iteration)
    return _COMPILED_ITERATION


def sinkhorn_potentials(
    cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, eps: torch.Tensor, max_iters: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn dual potentials f [B, N], g [B, M] for costs [B, N, M] and eps [B, 1, 1].

    Works on the scaled kernel -C/eps, computed once; f and g are kept divided by eps. The marginal error is
    checked every 10 iterations only (each check synchronises a GPU); tol=0 runs exactly ``max_iters``.
    """
    log_kernel = -cost / eps  # [B, N, M]
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    iterate = _compiled_sinkhorn_iteration() if cost.is_cuda else sinkhorn_iteration
    for iteration in range(max_iters):
        f, g = iterate(log_kernel, g, log_a, log_b)
        if tol > 0 and (iteration + 1) % 10 == 0:
            log_plan = log_kernel + (f + log_a).unsqueeze(2) + (g + log_b).unsqueeze(1)
            row_error = (torch.logsumexp(log_plan, dim=2).exp() - log_a.exp()).abs().sum(-1).max()
            if row_error < tol:
                break
    return f * eps[..., 0], g * eps[..., 0]


def sinkhorn_cost(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float = 0.05, max_iters: int = 200, tol: float = 1e-5
) -> torch.Tensor:
    """Entropic OT value per sample, batched: [B, N, M], [B, N], [B, M] -> [B].

    eps_b = reg * mean(cost_b). The value is the dual objective at the computed potentials,
    <f, a> + <g, b> - eps * sum(P) + eps with P = a b^T exp((f + g - C) / eps), which equals the primal
    OT_eps at convergence; f and g are held fixed (envelope theorem), so dC = P, da = f - eps, db = g - eps.
    """
    if reg <= 0:
        raise ValueError(f"Sinkhorn needs reg > 0, got {reg}")
    cost = cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost
    a, b = a.to(cost.dtype), b.to(cost.dtype)
    finite = torch.isfinite(cost.detach()).flatten(1).all(dim=1)
    safe_cost = torch.where(finite.view(-1, 1, 1), cost, torch.zeros_like(cost))
    eps = (reg * safe_cost.detach().mean(dim=(1, 2), keepdim=True)).clamp_min(1e-12)
    tiny = torch.finfo(cost.dtype).tiny
    log_a, log_b = a.detach().clamp_min(tiny).log(), b.detach().clamp_min(tiny).log()
    with torch.no_grad():
        f, g = sinkhorn_potentials(safe_cost.detach(), log_a, log_b, eps, max_iters, tol)
    plan = a.unsqueeze(2) * b.unsqueeze(1) * torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - safe_cost) / eps)
    eps_flat = eps.view(-1)
    value = (a * f).sum(-1) + (b * g).sum(-1) - eps_flat * plan.sum(dim=(1, 2)) + eps_flat
    return torch.where(finite, value, torch.full_like(value, math.nan))
