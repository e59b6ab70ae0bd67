import itertools
import math

import numpy as np
import pytest
import torch

from dali.losses import AttentiveTokenWeights, mmd_loss, ot_loss, squared_euclidean_cost


def clouds(batch=3, n=12, m=15, dim=6, shift=0.7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, m, dim, generator=generator, dtype=torch.float64) + shift
    return x, y


def original_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The original MMDLoss, written out in numpy for one sample."""
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    h = d2.sum() / (len(z) ** 2 - len(z))
    k = sum(np.exp(-d2 / (h * m)) for m in (0.25, 0.5, 1, 2, 4))
    n = len(x)
    return k[:n, :n].mean() - 2 * k[:n, n:].mean() + k[n:, n:].mean()


def test_mmd_golden_values_zero_and_symmetry():
    x, y = clouds()
    expected = np.mean([original_mmd(x[i].numpy(), y[i].numpy()) for i in range(3)])
    assert mmd_loss(x, y).item() == pytest.approx(expected, rel=1e-4)
    assert mmd_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd_loss(x, y).item() == pytest.approx(mmd_loss(y, x).item(), rel=1e-5)
    far = mmd_loss(x, y + 5.0).item()
    assert far > mmd_loss(x, y).item() > 0


def test_mmd_gradient_reaches_inputs():
    x, y = clouds()
    x.requires_grad_(True)
    mmd_loss(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def brute_force_emd(cost: torch.Tensor) -> float:
    """Exact EMD with uniform weights and equal sizes: the best permutation."""
    n = cost.shape[0]
    return min(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n))) / n


def test_emd_equals_brute_force_and_beats_any_coupling():
    x, y = clouds(batch=2, n=5, m=5)
    cost = squared_euclidean_cost(x, y)
    expected = np.mean([brute_force_emd(cost[i]) for i in range(2)])
    assert ot_loss(x, y, solver="emd").item() == pytest.approx(expected, rel=1e-6)
    x, y = clouds()
    independent = squared_euclidean_cost(x, y).mean(dim=(1, 2)).mean().item()  # cost of the product coupling
    assert ot_loss(x, y, solver="emd").item() <= independent + 1e-9


def test_sinkhorn_converges_to_emd_as_reg_shrinks():
    x, y = clouds()
    exact = ot_loss(x, y, solver="emd").item()
    gaps = [
        abs(ot_loss(x, y, solver="sinkhorn", reg=reg, max_iters=20000, tol=1e-9).item() - exact)
        for reg in (0.1, 0.02, 0.004)
    ]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] / exact < 0.02


def test_batched_equals_per_sample():
    x, y = clouds()
    wx = torch.softmax(torch.randn(3, 12, dtype=torch.float64), -1)
    for solver in ("emd", "sinkhorn"):
        batched = ot_loss(x, y, x_weights=wx, solver=solver).item()
        single = np.mean(
            [ot_loss(x[i : i + 1], y[i : i + 1], x_weights=wx[i : i + 1], solver=solver).item() for i in range(3)]
        )
        assert batched == pytest.approx(single, rel=1e-6)


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_ot_gradients_reach_tokens_and_weights(solver):
    x, y = clouds()
    x.requires_grad_(True)
    logits = torch.zeros(3, 12, dtype=torch.float64, requires_grad=True)
    loss = ot_loss(x, y, x_weights=torch.softmax(logits, -1), solver=solver, reg=0.01, max_iters=5000, tol=1e-9)
    loss.backward()
    assert x.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_sinkhorn_cost_gradient_matches_finite_differences():
    x, y = clouds(batch=1, n=4, m=5, dim=3)
    x.requires_grad_(True)

    def value(points):
        return ot_loss(points, y, solver="sinkhorn", reg=0.05, max_iters=20000, tol=1e-12)

    value(x).backward()
    step = 1e-5
    bumped = x.detach().clone()
    bumped[0, 1, 2] += step
    lowered = x.detach().clone()
    lowered[0, 1, 2] -= step
    numeric = (value(bumped).item() - value(lowered).item()) / (2 * step)
    # eps is a detached function of the cost, so the analytic gradient treats it as constant: allow for that
    assert x.grad[0, 1, 2].item() == pytest.approx(numeric, rel=0.05, abs=1e-4)


def test_bad_weights_and_non_finite_costs():
    x, y = clouds()
    with pytest.raises(ValueError, match="x_weights"):
        ot_loss(x, y, x_weights=torch.full((3, 12), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="y_weights must have shape"):
        ot_loss(x, y, y_weights=torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="solver"):
        ot_loss(x, y, solver="magic")
    x = x.clone()
    x[1, 0, 0] = float("nan")
    for solver in ("emd", "sinkhorn"):
        assert math.isnan(ot_loss(x, y, solver=solver).item())


def test_attentive_weights_shapes_entropy_and_original_names():
    torch.manual_seed(0)
    scorer = AttentiveTokenWeights(dim=16, num_heads=2)
    audio, image = torch.randn(2, 7, 16), torch.randn(2, 9, 16)
    weights = scorer(audio, image)
    assert weights.audio.shape == (2, 7) and weights.image.shape == (2, 9)
    assert torch.allclose(weights.audio.sum(-1), torch.ones(2)) and torch.allclose(weights.image.sum(-1), torch.ones(2))
    # the half-uniform mix bounds every weight below by 1 / (2 n)
    assert (weights.audio >= 0.5 / 7 - 1e-7).all() and (weights.image >= 0.5 / 9 - 1e-7).all()
    assert (weights.entropy <= math.log(7) + math.log(9) + 1e-5).all()
    names = set(scorer.state_dict())
    assert {"audio_scorer.in_proj_weight", "image_scorer.out_proj.weight", "a_q.weight", "i_v.bias"} <= names
    loss = ot_loss(audio, image, weights.audio, weights.image, solver="sinkhorn") - weights.entropy.mean()
    loss.backward()
    assert scorer.a_q.weight.grad.abs().sum() > 0 and scorer.audio_scorer.in_proj_weight.grad.abs().sum() > 0


def test_parallel_emd_matches_pot_value_and_gradients():
    x, y = clouds()
    wx = torch.softmax(torch.randn(3, 12, dtype=torch.float64), -1)
    grads = []
    for workers in (0, 2):
        xx, logits = x.clone().requires_grad_(True), torch.log(wx).clone().requires_grad_(True)
        value = ot_loss(xx, y, x_weights=torch.softmax(logits, -1), solver="emd", workers=workers)
        value.backward()
        grads.append((value.item(), xx.grad.clone(), logits.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-9)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-8) and torch.allclose(grads[0][2], grads[1][2], atol=1e-8)
    # another shape and float32: the shared blocks are replaced, the workers follow
    small_x, small_y = x[:2, :5].float(), y[:2, :7].float()
    assert ot_loss(small_x, small_y, solver="emd", workers=2).item() == pytest.approx(
        ot_loss(small_x, small_y, solver="emd").item(), rel=1e-5
    )


@pytest.mark.gpu
def test_sinkhorn_on_gpu_runs_compiled_and_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 64, 16, generator=generator), torch.randn(4, 80, 16, generator=generator)
    on_cpu = ot_loss(x, y, solver="sinkhorn", max_iters=50, tol=0)
    on_gpu = ot_loss(x.cuda(), y.cuda(), solver="sinkhorn", max_iters=50, tol=0)
    assert on_gpu.item() == pytest.approx(on_cpu.item(), rel=1e-4)
