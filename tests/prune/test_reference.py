"""The slow references are the yardstick of the fast code: check them against first principles."""

import torch

from endor.prune.reference import lowest_indices, sparsegpt_reference
from tests.prune.inputs import correlated_inputs


def test_lowest_indices_breaks_ties_to_the_lower_index():
    assert lowest_indices([3.0, 1.0, 1.0, 0.0, 1.0], 3) == [3, 1, 2]
    assert lowest_indices([], 0) == []


def test_sparsegpt_reference_update_is_the_constrained_least_squares_optimum():
    # One row, one pruned weight: with the columns before it frozen, the remaining weights must
    # minimise the output error (w - w') H (w - w')^T subject to w'_c = 0.
    x = correlated_inputs(200, 6, seed=1).double()
    hessian = 2 / 200 * x.T @ x
    weight = torch.tensor([[0.9, -0.05, 0.7, 0.4, -0.6, 0.3]], dtype=torch.float64)
    pruned = sparsegpt_reference(weight, hessian, sparsity=1 / 6, block_size=6, damping=0.0)
    (c,) = (pruned[0] == 0).nonzero()[0].tolist()
    free = slice(c + 1, 6)
    # d = w - w' has d_j = 0 before c, d_c = w_c; minimise d H d^T over d[free].
    rhs = -hessian[free, c] * weight[0, c]
    d_free = torch.linalg.solve(hessian[free, free], rhs)
    expected = weight[0].clone()
    expected[c] = 0
    expected[free] -= d_free
    torch.testing.assert_close(pruned[0], expected, rtol=1e-10, atol=1e-12)
    # And the pruned weight is the one of least saliency w_c^2 / [H_F^-1]_cc.
    saliency = [weight[0, j] ** 2 / torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(6)]
    assert c == min(range(6), key=lambda j: saliency[j])
