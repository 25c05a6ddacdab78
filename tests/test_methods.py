"""Each merge method on tiny tensors, against values worked out by hand (independent of mergekit),
and the exact rank selection in `_select.py` against mergekit's sort calls."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.methods import MergeInputs, get_method
from mergelab.methods.arcee_fusion import importance, upper_fence
from mergelab.methods._select import rank_window_mask, sorted_ranks, top_k_mask, value_at_rank

T = torch.tensor


def run(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None,
        params: list[dict[str, Any]] | None = None, *, seed: int = 0, tensor: str = "w", **options: Any) -> torch.Tensor:
    """Call method `name` on one tensor, filling every parameter not given with its default."""
    method = get_method(name)
    params = params if params is not None else [{} for _ in tensors]
    full = [{p.name: given.get(p.name, p.default) for p in method.params if p.scope == "model"} for given in params]
    opts = {p.name: options.get(p.name, p.default) for p in method.params if p.scope == "global"}
    assert all(p.name in given or not p.required for given in params for p in method.params if p.scope == "model")
    return method.merge(MergeInputs(tensor, tensors, base, full, opts, seed=seed))


def close(actual: torch.Tensor, expected: Any) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- linear, task arithmetic
def test_linear_normalize_on_and_off() -> None:
    xs, ps = [T([1.0, 2.0]), T([3.0, 6.0])], [{"weight": 1.0}, {"weight": 3.0}]
    close(run("linear", xs, params=ps, normalize=True), [2.5, 5.0])  # (1*1 + 3*3) / 4, (2 + 18) / 4
    close(run("linear", xs, params=ps, normalize=False), [10.0, 20.0])


def test_task_arithmetic_lambda() -> None:
    b = T([1.0, 1.0, 1.0])
    xs = [T([2.0, 0.0, 1.0]), T([1.0, 3.0, -1.0])]  # d1 = [1, -1, 0], d2 = [0, 2, -2]
    out = run("task_arithmetic", xs, b, [{"weight": 0.5}, {"weight": 1.0}], **{"lambda": 2.0})
    close(out, [2.0, 4.0, -3.0])  # b + 2 * ([0.5, -0.5, 0] + [0, 2, -2])


# ---------------------------------------------------------------- TIES
# task vectors on a zero base; with density 0.5 each keeps its top 3 of 6 magnitudes:
D1 = T([3.0, -1.0, 2.0, 0.5, -4.0, 1.0])  # trimmed [3, 0, 2, 0, -4, 0]
D2 = T([-2.0, -2.5, 1.0, 0.1, 3.0, -5.0])  # trimmed [0, -2.5, 0, 0, 3, -5]
D3 = T([1.0, 4.0, -3.0, 0.2, -1.0, 2.0])  # trimmed [0, 4, -3, 0, 0, 2]


def ties(weights: list[float], **options: Any) -> torch.Tensor:
    base = torch.ones(6)
    ps = [{"weight": w, "density": 0.5} for w in weights]
    return run("ties", [base + D1, base + D2, base + D3], base, ps, **options) - base


def test_ties_equal_weights_by_hand() -> None:
    # elected signs (sum of trimmed): [+3, +1.5, -1, 0 -> +, -1, -3]; mean of the agreeing entries
    close(ties([1.0, 1.0, 1.0]), [3.0, 4.0, -3.0, 0.0, -4.0, -5.0])


def test_ties_weighted_sign_election_and_normalize() -> None:
    # weighted: e1 = [3,0,2,0,-4,0], e2 = [0,-1.25,0,0,1.5,-2.5], e3 = [0,8,-6,0,0,4]
    # elected from sum(e): [+, +, -, +, -, + (-2.5 + 4)]; divisor = sum of agreeing weights
    close(ties([1.0, 0.5, 2.0], normalize=True), [3.0, 4.0, -3.0, 0.0, -4.0, 2.0])
    close(ties([1.0, 0.5, 2.0], normalize=False), [3.0, 8.0, -6.0, 0.0, -4.0, 4.0])


def test_ties_paper_variant_elects_from_trimmed() -> None:
    # sign_from trimmed: entry 5 elects sign(-5 + 2) = -, so only e2 = -2.5 (weight 0.5) survives
    close(ties([1.0, 0.5, 2.0], normalize=True, sign_from="trimmed"), [3.0, 4.0, -3.0, 0.0, -4.0, -5.0])


def test_ties_equal_magnitudes_keep_exactly_k() -> None:
    base = torch.zeros(6)
    delta = T([1.0, -1.0, 1.0, 1.0, 2.0, -2.0])
    out = run("ties", [delta], base, [{"weight": 1.0, "density": 0.5}])
    assert int((out != 0).sum()) == 3  # both 2s and exactly one of the four tied 1s
    assert out[4] == 2 and out[5] == -2
    # which tied 1 survives is the one mergekit's (unstable) argsort puts third
    third = int(torch.argsort(delta.abs(), descending=True)[2])
    assert out[third] == delta[third]
    # tie_break: position keeps the first of them instead, without sorting
    first = run("ties", [delta], base, [{"weight": 1.0, "density": 0.5}], tie_break="position")
    assert first.tolist() == [1.0, 0.0, 0.0, 0.0, 2.0, -2.0]


def test_ties_density_edges() -> None:
    base = T([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    xs = [base + D1, base + D2]
    ps = lambda d: [{"weight": 1.0, "density": d}, {"weight": 1.0, "density": d}]  # noqa: E731
    close(run("ties", xs, base, ps(0.0)), base)  # nothing survives
    # density 1: no trimming; signs of D1 + D2 = [+1, -3.5, +3, +0.6, -1, -4]
    close(run("ties", xs, base, ps(1.0)) - base, [3.0, -1.75, 1.5, 0.3, -4.0, -5.0])
    # int(0.1 * 6) = 0, but a positive density keeps at least one entry: the largest
    one = run("ties", [base + D2], base, [{"weight": 1.0, "density": 0.1}]) - base
    close(one, [0.0, 0.0, 0.0, 0.0, 0.0, -5.0])


def reference_ties(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES over the whole flat tensor with a full sort: trim, elect, disjoint weighted mean."""
    deltas = []
    for x in xs:
        d = x - base
        k = max(1, int(density * d.numel()))
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[d.abs().argsort(descending=True)[:k]] = True
        deltas.append(d * keep)
    e = torch.stack([d * w for d, w in zip(deltas, weights)])  # (models, n)
    sign = torch.where(e.sum(0) >= 0, 1.0, -1.0)
    agree = e.sign() == sign
    w = torch.tensor(weights)[:, None]
    divisor = (agree * w).sum(0)
    return base + (e * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def test_ties_large_tensor_matches_full_sort_reference() -> None:
    """Above 2^18 elements the merge runs in chunks and the top-k takes the sampled path."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(600, 500, generator=g)
    xs = [base + torch.randn(600, 500, generator=g) * s for s in (0.5, 1.0, 2.0)]
    out = run("ties", xs, base, [{"weight": w, "density": 0.3} for w in (0.5, 1.0, 0.7)])
    expected = reference_ties(base.reshape(-1), [x.reshape(-1) for x in xs], [0.5, 1.0, 0.7], 0.3)
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- breadcrumbs
DELTA10 = T([5.0, -1.0, 9.0, 3.0, -10.0, 2.0, 7.0, -4.0, 8.0, 6.0])  # magnitudes 1..10, shuffled


def test_breadcrumbs_window() -> None:
    # density 0.5, gamma 0.2: drop the 2 largest (10, 9) and the 3 smallest (1, 2, 3)
    out = run("breadcrumbs", [DELTA10], torch.zeros(10), [{"weight": 2.0, "density": 0.5, "gamma": 0.2}])
    kept = torch.where(DELTA10.abs().ge(4) & DELTA10.abs().le(8), DELTA10, 0.0)
    close(out, 2 * kept)


def test_breadcrumbs_outlier_cut_shrinks_to_meet_density() -> None:
    # density 0.9 keeps 9 of 10, so n_bot = max(0, 10 - 9 - 2) = 0: only the largest one goes
    out = run("breadcrumbs", [DELTA10], torch.zeros(10), [{"weight": 1.0, "density": 0.9, "gamma": 0.2}])
    close(out, torch.where(DELTA10.abs() == 10, 0.0, DELTA10))


def test_breadcrumbs_ties_elects_sign_after_window() -> None:
    base = torch.zeros(10)
    other = -DELTA10 * 0.5  # opposite signs, half the size: loses every election where both survive
    ps = [{"weight": 1.0, "density": 0.5, "gamma": 0.2}, {"weight": 1.0, "density": 1.0, "gamma": 0.0}]
    out = run("breadcrumbs_ties", [DELTA10, other], base, ps, normalize=False)
    window = DELTA10.abs().ge(4) & DELTA10.abs().le(8)
    close(out, torch.where(window, DELTA10, other))  # outside the window only `other` is left


# ---------------------------------------------------------------- DARE
def dare(name: str, x: torch.Tensor, base: torch.Tensor, density: float, seed: int = 0, tensor: str = "w",
         **options: Any) -> torch.Tensor:
    return run(name, [x], base, [{"weight": 1.0, "density": density}], seed=seed, tensor=tensor, **options)


def test_dare_is_reproducible_from_the_seed() -> None:
    g = torch.Generator().manual_seed(1)
    base, x = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    first = dare("dare_ties", x, base, 0.5, seed=7)
    assert torch.equal(first, dare("dare_ties", x, base, 0.5, seed=7))
    assert not torch.equal(first, dare("dare_ties", x, base, 0.5, seed=8))
    assert not torch.equal(first, dare("dare_ties", x, base, 0.5, seed=7, tensor="other.weight"))


def test_dare_keep_fraction_is_density() -> None:
    base, x = torch.zeros(200_000), torch.ones(200_000)
    kept = dare("dare_linear", x, base, 0.3, rescale=False) != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # 5 standard deviations


def test_dare_probability_rescale_divides_by_density() -> None:
    g = torch.Generator().manual_seed(2)
    base, x = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    out = dare("dare_linear", x, base, 0.25, rescale=True, rescale_mode="probability")
    d, kept = out - base, (x - base) * (1 / 0.25)
    survivors = dare("dare_linear", x, base, 0.25, rescale=False) != base
    assert 0.2 < survivors.float().mean() < 0.3
    torch.testing.assert_close(out[survivors], (base + kept)[survivors], rtol=1e-6, atol=0)
    assert torch.equal(out[~survivors], base[~survivors])
    assert d.abs().sum() > (x - base).abs().sum() * 0.9  # rescaling made up for the dropped mass


def test_dare_l1_rescale_preserves_l1_norm() -> None:
    g = torch.Generator().manual_seed(3)
    base, x = torch.randn(5_000, generator=g), torch.randn(5_000, generator=g)
    out = dare("dare_ties", x, base, 0.2, rescale=True, rescale_mode="l1")
    assert 0.15 < ((out - base) != 0).float().mean() < 0.25
    torch.testing.assert_close((out - base).abs().sum(), (x - base).abs().sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize(("randomised", "plain", "options"), [
    ("dare_linear", "task_arithmetic", {}),
    ("della_linear", "task_arithmetic", {}),
    ("dare_ties", "ties", {"normalize": True}),
    ("della", "ties", {"normalize": True}),
])
def test_randomised_methods_at_density_one_are_their_plain_method(randomised: str, plain: str, options: dict) -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(32, 16, generator=g)
    xs = [base + torch.randn(32, 16, generator=g) for _ in range(3)]
    ps = [{"weight": w, "density": 1.0} for w in (0.3, 0.5, 0.9)]
    assert torch.equal(run(randomised, xs, base, ps, **options), run(plain, xs, base, ps, **options))


# ---------------------------------------------------------------- DELLA
def test_della_keep_probability_follows_row_rank() -> None:
    rows, cols, density, eps = 20_000, 16, 0.5, 0.2
    g = torch.Generator().manual_seed(5)
    ranks = torch.rand(rows, cols, generator=g).argsort(dim=1)  # (rows, cols): a rank permutation per row
    delta = (ranks + 1).float() * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    out = run("della_linear", [delta], torch.zeros(rows, cols), [{"weight": 1.0, "density": density, "epsilon": eps}],
              rescale=False)
    kept = out != 0
    for r in range(cols):
        expected = density - eps + 2 * eps * r / (cols - 1)
        rate = kept[ranks == r].float().mean().item()
        assert abs(rate - expected) < 0.02, (r, rate, expected)


def test_della_probability_rescale_divides_by_keep_probability() -> None:
    delta = T([[1.0, -2.0, 3.0, -4.0, 5.0]]).repeat(4000, 1)  # ranks 0..4 in every row
    out = run("della_linear", [delta], torch.zeros_like(delta), [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
              rescale=True, rescale_mode="probability")
    probs = T([0.3, 0.4, 0.5, 0.6, 0.7])
    survivors = out != 0
    torch.testing.assert_close(out[survivors], (delta / probs)[survivors], rtol=1e-6, atol=0)
    assert (survivors.float().mean(0) - probs).abs().max() < 0.04


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_rejects_probabilities_outside_zero_one(density: float, epsilon: float) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        run("della", [torch.ones(4, 4)], torch.zeros(4, 4), [{"weight": 1.0, "density": density, "epsilon": epsilon}])


# ---------------------------------------------------------------- SLERP, NuSLERP
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return run("slerp", [v1], v0, [{}], t=t)


def test_slerp_endpoints() -> None:
    g = torch.Generator().manual_seed(6)
    v0, v1 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    close(slerp(0.0, v0, v1), v0)
    close(slerp(1.0, v0, v1), v1)


def test_slerp_orthogonal_midpoint() -> None:
    v0, v1 = T([[2.0, 0.0], [0.0, 0.0]]), T([[0.0, 3.0], [0.0, 0.0]])
    close(slerp(0.5, v0, v1), (v0 + v1) / math.sqrt(2))  # sin(pi/4) / sin(pi/2) each


def test_slerp_walks_the_arc() -> None:
    theta, t = 1.2, 0.3
    out = slerp(t, T([1.0, 0.0]), T([math.cos(theta), math.sin(theta)]))
    close(out, [math.cos(t * theta), math.sin(t * theta)])  # unit vector at angle t * theta


def test_slerp_nearly_colinear_is_lerp() -> None:
    v0, v1 = T([1.0, 1.0]), T([1.01, 1.0])  # cos > 0.9995
    close(slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1)


X0 = T([[1.0, 0.0], [1.0, 0.0]])
X1 = T([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(("options", "expected"), [
    # the whole tensor: cos = 1/2, theta = pi/3, both coefficients sin(pi/6) / sin(pi/3)
    ({}, (X0 + X1) * (math.sin(math.pi / 6) / math.sin(math.pi / 3))),
    # each row x[i, :]: row 0 orthogonal, row 1 identical (linear branch)
    ({"nuslerp_flatten": False}, T([[1 / math.sqrt(2), 1 / math.sqrt(2)], [1.0, 0.0]])),
    # `row_wise` (mergekit's name): each x[:, j]; column 0 at pi/4, column 1 against a zero vector
    ({"nuslerp_flatten": False, "nuslerp_row_wise": True},
     T([[math.sin(math.pi / 8) / math.sin(math.pi / 4), math.sin(math.pi / 4)],
        [2 * math.sin(math.pi / 8) / math.sin(math.pi / 4), 0.0]])),
])
def test_nuslerp_vectors_by_hand(options: dict, expected: torch.Tensor) -> None:
    ps = [{"weight": 2.0}, {"weight": 2.0}]  # t = 0.5
    close(run("nuslerp", [X0, X1], None, ps, **options), expected)
    base = T([[0.5, -1.0], [2.0, 3.0]])  # with a base, the task vectors are interpolated
    close(run("nuslerp", [X0 + base, X1 + base], base, ps, **options), expected + base)


def test_nuslerp_t_from_weights() -> None:
    out = run("nuslerp", [T([[1.0, 0.0]]), T([[0.0, 1.0]])], None, [{"weight": 1.0}, {"weight": 3.0}])
    close(out, [[math.cos(0.75 * math.pi / 2), math.sin(0.75 * math.pi / 2)]])  # t = 3 / 4


# ---------------------------------------------------------------- model stock, passthrough
def test_model_stock_known_angle() -> None:
    base = T([1.0, 2.0])
    offsets = [T([1.0, 0.0]), T([math.cos(math.pi / 3), math.sin(math.pi / 3)])]  # cos = 1/2
    t = 2 * 0.5 / (1 + 0.5)  # N cos / (1 + (N - 1) cos)
    out = run("model_stock", [base + o for o in offsets], base)
    close(out, base + t * (offsets[0] + offsets[1]) / 2)


def test_model_stock_orthogonal_and_opposite_keep_the_base() -> None:
    base = T([1.0, 2.0, 3.0])
    eye = torch.eye(3)
    close(run("model_stock", [base + eye[i] for i in range(3)], base), base)  # cos 0: t = 0
    close(run("model_stock", [base + eye[0], base - eye[0]], base), base)  # cos -1: 1 + cos = 0


def test_model_stock_filter_wise_one_angle_per_row() -> None:
    base = torch.zeros(2, 2)
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[math.cos(math.pi / 3), math.sin(math.pi / 3)], [0.0, 1.0]])  # row 0 at 60 deg, row 1 at 90 deg
    out = run("model_stock", [a, b], base, filter_wise=True)
    close(out, torch.stack([(a[0] + b[0]) / 2 * (2 / 3), base[1]]))  # row 0: t = 2/3; row 1: t = 0
    whole = run("model_stock", [a, b], base, filter_wise=False)
    assert not torch.allclose(whole, out)


def test_passthrough_scale() -> None:
    x = T([[1.0, -2.0], [3.0, 0.5]])
    close(run("passthrough", [x], None, [{"scale": 2.5}]), x * 2.5)
    assert torch.equal(run("passthrough", [x], None, [{}]), x)


# ---------------------------------------------------------------- Multi-SLERP
def test_multislerp_two_orthogonal_at_equal_weights_is_the_slerp_midpoint() -> None:
    out = run("multislerp", [T([[1.0, 0.0]]), T([[0.0, 1.0]])], None, [{"weight": 1.0}, {"weight": 1.0}])
    close(out, [[1 / math.sqrt(2), 1 / math.sqrt(2)]])


def test_multislerp_mean_direction_at_mean_norm() -> None:
    # units [1, 0] and [0, 1], weights 1/4 and 3/4: direction (1, 3) / sqrt(10), norm 2/4 + 1 * 3/4 = 1.25;
    # the tangent-plane step adds nothing (sum_i w_i t_i is the mean's own tangent part: zero)
    v0, v1 = T([[2.0, 0.0]]), T([[0.0, 1.0]])
    ps = [{"weight": 1.0}, {"weight": 3.0}]
    close(run("multislerp", [v0, v1], None, ps), 1.25 / math.sqrt(10) * T([[1.0, 3.0]]))
    # unnormalised weights 1 and 3: the same direction at norm 1 * 2 + 3 * 1 = 5
    close(run("multislerp", [v0, v1], None, ps, normalize_weights=False), 5 / math.sqrt(10) * T([[1.0, 3.0]]))
    base = T([[0.5, -1.0]])  # with a base the task vectors are interpolated
    close(run("multislerp", [v0 + base, v1 + base], base, ps), base + 1.25 / math.sqrt(10) * T([[1.0, 3.0]]))


def test_multislerp_one_model_is_returned_and_cancelling_pairs_go_linear() -> None:
    x = T([1.0, -2.0])
    assert torch.equal(run("multislerp", [x], torch.zeros(2), [{"weight": 0.3}]), x)
    # v and -2v at equal weights: the unit vectors cancel, so 0.5 v + 0.5 (-2 v)
    close(run("multislerp", [x, -2 * x], None, [{"weight": 1.0}, {"weight": 1.0}]), -0.5 * x)


def test_multislerp_cancelling_three_is_an_error_naming_the_weights() -> None:
    xs = [T([1.0, 0.0]), T([-1.0, 0.0]), T([0.0, 0.0])]
    with pytest.raises(RecipeError, match=r"tensor 'w'.*parameters\.weight"):
        run("multislerp", xs, None, [{"weight": 1.0}] * 3)


# ---------------------------------------------------------------- Karcher mean
def test_karcher_two_models_midpoint_at_mean_norm() -> None:
    out = run("karcher", [T([2.0, 0.0]), T([0.0, 4.0])])
    close(out, 3 * T([1.0, 1.0]) / math.sqrt(2))  # bisector, norm (2 + 4) / 2


def test_karcher_mean_is_the_mean_angle() -> None:
    # directions at angles 0, 0 and pi/2: the Karcher mean on the circle is the mean angle pi/6
    # (one gradient step reaches it); the start, the normalised linear mean, is at atan(1/2)
    xs = [T([1.0, 0.0]), T([2.0, 0.0]), T([0.0, 3.0])]  # norms 1, 2, 3: mean 2
    angle = math.pi / 6
    torch.testing.assert_close(run("karcher", xs), T([2 * math.cos(angle), 2 * math.sin(angle)]), rtol=0, atol=1e-5)
    close(run("karcher", xs, max_iter=0), 2 * T([2.0, 1.0]) / math.sqrt(5))


def test_karcher_zero_model_shrinks_the_norm_not_the_direction() -> None:
    xs = [T([3.0, 0.0]), T([0.0, 3.0]), T([0.0, 0.0])]
    close(run("karcher", xs), (3 + 3 + 0) / 3 * T([1.0, 1.0]) / math.sqrt(2))
    close(run("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    x = T([1.0, 2.0])
    assert torch.equal(run("karcher", [x]), x)


# ---------------------------------------------------------------- SCE
SCE_D1 = T([1.0, -2.0, 0.5, 0.0])
SCE_D2 = T([3.0, 1.0, -0.5, 0.0])


def sce(scale: float = 1.0, **options: Any) -> torch.Tensor:
    base = T([1.0, 1.0, -1.0, 2.0])
    return run("sce", [base + scale * SCE_D1, base + scale * SCE_D2], base, **options) - base


def test_sce_weights_from_mean_squares_and_sign_erase() -> None:
    # mean squares 5.25/4 and 10.25/4: w = 21/62, 41/62; elected signs of d1 + d2 = [4, -1, 0, 0]: +, -, +, +
    # entry 0 both agree; 1 only d1 (-2); 2 only d1 (0.5, the sum 0 counts as +); 3 nobody
    close(sce(), [(21 * 1 + 41 * 3) / 62, -2.0, 0.5, 0.0])


def test_sce_select_keeps_top_variance_of_the_nonzero() -> None:
    # variances across the two models: [1, 2.25, 0.25, 0]; three nonzero
    # select_topk 0.7 keeps int(3 * 0.7) = 2 (entries 1, 0); weights then 5/4 : 10/4 = 1/3 : 2/3
    close(sce(select_topk=0.7), [1 / 3 * 1 + 2 / 3 * 3, -2.0, 0.0, 0.0])
    # 0.5 keeps int(3 * 0.5) = 1 (counting all four entries would keep 2)
    close(sce(select_topk=0.5), [0.0, -2.0, 0.0, 0.0])
    close(sce(select_topk=0.0), [0.0, 0.0, 0.0, 0.0])


def test_sce_small_task_vectors_get_equal_weights() -> None:
    # mean squares ~1e-8 sum below 1e-6: weights 1/2 each, so entry 0 is (1 + 3) / 2, not 144/62
    out = sce(scale=1e-4) / 1e-4
    torch.testing.assert_close(out, T([2.0, -2.0, 0.5, 0.0]), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- RAM, RAM+
RAM_DELTAS = [T([0.5, 0.05, 0.3, 0.4, -0.2, 0.0]),
              T([0.3, 0.0, 0.0, 0.0, 0.4, 0.6]),
              T([-0.2, 0.0, 0.0, 0.0, 0.0, 0.0])]
# with epsilon 0.1, models changing each entry: [3, 0 (0.05 is below), 1, 1, 2, 1]


def ram(name: str, **options: Any) -> torch.Tensor:
    base = torch.ones(6)
    return run(name, [base + d for d in RAM_DELTAS], base, epsilon=0.1, **options) - base


def test_ram_averages_over_the_models_that_changed_an_entry() -> None:
    close(ram("ram"), [(0.5 + 0.3 - 0.2) / 3, 0.0, 0.3, 0.4, (-0.2 + 0.4) / 2, 0.6])


def test_ramplus_boosts_unique_entries_by_overlap_ratio() -> None:
    # model 1: 2 shared, 2 unique entries: rho 1; model 2: 2 shared, 1 unique: rho 2; s = 1 + r min(rho, alpha)
    close(ram("ramplus_tl", r=0.5, alpha=2.0), [0.2, 0.0, 0.3 * 1.5, 0.4 * 1.5, 0.1, 0.6 * 2.0])
    close(ram("ramplus_tl", r=0.5, alpha=0.5), [0.2, 0.0, 0.3 * 1.25, 0.4 * 1.25, 0.1, 0.6 * 1.25])
    close(ram("ramplus_tl", r=0.0), ram("ram"))


# ---------------------------------------------------------------- NearSwap
def test_nearswap_swaps_near_entries_and_steps_towards_far_ones() -> None:
    a, b = T([0.0, 0.0, 0.0, 1.0]), T([0.05, -0.2, 0.0, 3.0])
    # |a - b| = [0.05, 0.2, 0 (-> 1e-6), 2]: w = [1, 0.5, 1, 0.05]
    close(run("nearswap", [b], a, t=0.1), [0.05, -0.1, 0.0, 1.1])
    close(run("nearswap", [b], a, t=-1.0), a)
    close(run("nearswap", [b], a, t=5.0), b)


# ---------------------------------------------------------------- Arcee Fusion
def test_arcee_fusion_importance_is_change_times_row_kl() -> None:
    x, b = T([[math.log(3.0), 0.0]]), T([[0.0, 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # softmax [3/4, 1/4] against [1/2, 1/2]
    close(importance(x, b), [[math.log(3.0) * kl, 0.0]])


def test_arcee_fusion_keeps_changes_above_the_upper_fence() -> None:
    # rows are shifts of one change v, so every row has the same KL k and importance is k |v|;
    # of 20 sorted |v|: Q1 = rank 4 (0.2), median = rank 9 (0.3), Q3 = rank 14 (0.4): fence k 0.6
    v = T([0.1, -0.2, 0.3, 0.4, 3.0])
    delta = torch.stack([v.roll(i) for i in range(4)])  # (4, 5)
    base = torch.full((4, 5), 0.7)  # a constant row: softmax uniform, shift-invariant
    out = run("arcee_fusion", [base + delta], base)
    close(out, base + torch.where(delta.abs() == 3.0, delta, 0.0))


def test_arcee_fusion_fence_uses_exact_ranks() -> None:
    g = torch.Generator().manual_seed(11)
    s = torch.rand(300_007, generator=g)  # above 2^17: the sampled-bracket selection
    ordered, last = s.sort().values, s.numel() - 1
    expected = ordered[last // 2] + 1.5 * (ordered[3 * last // 4] - ordered[last // 4])
    assert upper_fence(s) == expected


# ---------------------------------------------------------------- exact rank selection
N = 300_007  # above 2^17: the sampled-bracket path


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    ints = torch.randint(0, 50, (N,), generator=g).float()  # heavy ties
    strided = torch.zeros(N)
    strided[:: N // (1 << 16)] = 1000 + torch.arange(len(strided[:: N // (1 << 16)])).float()  # a lying sample
    return {
        "random": torch.randn(N, generator=g),
        "ties": ints,
        "ascending": ints.sort().values,
        "descending": ints.sort(descending=True).values,
        "constant": torch.full((N,), 3.0),
        "strided": strided,
        "matrix": torch.randint(-5, 5, (547, 549), generator=g).float(),
    }


TENSORS = _tensors()


@pytest.mark.parametrize("kind", TENSORS)
def test_value_at_rank_matches_sort(kind: str) -> None:
    v = TENSORS[kind].reshape(-1)
    ordered = v.sort().values
    for r in (0, 1, 17, v.numel() // 3, v.numel() // 2, v.numel() - 2, v.numel() - 1):
        val, below, equal = value_at_rank(v, r)
        assert val == ordered[r]
        assert below == int((v < val).sum()) and equal == int((v == val).sum())


def mergekit_top_k(v: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit 0.1.5's TIES trim on CPU (`sparsify.magnitude`): the first k of a descending argsort."""
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    mask[torch.argsort(v.reshape(-1).float(), descending=True)[:k]] = True
    return mask.reshape(v.shape)


def mergekit_window(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """mergekit 0.1.5's breadcrumbs window on CPU (`sparsify.magnitude_outliers`): ascending sort, [lo, hi)."""
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    mask[torch.sort(v.reshape(-1).float(), descending=False).indices[lo:hi]] = True
    return mask.reshape(v.shape)


@pytest.mark.parametrize("kind", TENSORS)
def test_top_k_and_window_masks_match_mergekit(kind: str) -> None:
    v = TENSORS[kind]
    n = v.numel()
    for k in (1, n // 10, n // 2, n - 1):
        mask = top_k_mask(v, k)
        assert mask.shape == v.shape and int(mask.sum()) == k
        assert torch.equal(mask, mergekit_top_k(v, k))
    for lo, hi in ((0, n // 4), (n // 3, n // 3 + 1), (n // 5, n - n // 7), (0, n)):
        assert torch.equal(rank_window_mask(v, lo, hi), mergekit_window(v, lo, hi))


def test_torch_cpu_sort_is_not_stable() -> None:
    """Why ties take mergekit's own sort: its order among equal values is neither by position nor reversed."""
    v = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(0)).float()
    order = torch.argsort(v, descending=True)
    assert not torch.equal(order, torch.argsort(v, descending=True, stable=True))
    assert not torch.equal(order, torch.argsort(v, stable=True).flip(0))


def bf16_magnitudes(n: int, seed: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """|x - b| over bfloat16-valued weights in float32, as mergekit computes it for a `dtype: float32` recipe."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g)).bfloat16().float()
    x = (base + 0.004 * torch.randn(n, generator=g)).bfloat16().float()
    return (x - base).abs().reshape(shape or (n,))


@pytest.mark.parametrize("n, seed", [(7, 0), (100, 1), (4096, 2), (50_000, 3), (131_073, 4), (1_000_003, 5), (3_000_000, 6)])
def test_bf16_masks_match_mergekit(n: int, seed: int) -> None:
    """Over bf16-valued weights most cuts split a group of equal magnitudes: still mergekit's entries,
    from small tensors to large ones past torch's parallel grain (and the strided-sample selection)."""
    v = bf16_magnitudes(n, seed)
    assert int(v.unique().numel()) < n // 2 or n < 200  # heavy ties
    for density in (0.1, 0.5, 0.7, 0.93):
        k = max(1, int(density * n))
        assert torch.equal(top_k_mask(v, k), mergekit_top_k(v, k)), density
    for lo, hi in ((n // 10, n // 2), (0, int(0.8 * n)), (n // 20, n - n // 100)):
        assert torch.equal(rank_window_mask(v, lo, hi), mergekit_window(v, lo, hi)), (lo, hi)


def test_bf16_masks_match_mergekit_in_any_thread_count() -> None:
    v = bf16_magnitudes(2_000_000, 7, (1000, 2000))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(top_k_mask(v, 700_000), mergekit_top_k(v, 700_000))
    finally:
        torch.set_num_threads(before)


def stable_window(v: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """`tie_break: position`: the same sorts with `stable=True` (equal values by position)."""
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    mask[torch.argsort(v.reshape(-1), descending=descending, stable=True)[lo:hi]] = True
    return mask.reshape(v.shape)


@pytest.mark.parametrize("kind", [*TENSORS, "bf16"])
def test_position_tie_break_is_the_stable_sort_without_sorting(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v = TENSORS[kind] if kind in TENSORS else bf16_magnitudes(1_000_003, 8)
    n = v.numel()
    cuts = [(0, k) for k in (1, n // 10, n // 2, n - 1)]
    windows = [(0, n // 4), (n // 3, n // 3 + 1), (n // 5, n - n // 7), (0, n)]
    expected = [stable_window(v, lo, hi, True) for lo, hi in cuts] + [stable_window(v, lo, hi, False) for lo, hi in windows]
    monkeypatch.setattr(torch, "argsort", None)  # selection only: a sort would fail here
    monkeypatch.setattr(torch, "sort", None)
    got = [top_k_mask(v, k, tie_break="position") for _, k in cuts]
    got += [rank_window_mask(v, lo, hi, tie_break="position") for lo, hi in windows]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("tie_break", ["mergekit", "position"])
@pytest.mark.parametrize("kind", TENSORS)
def test_masks_from_remembered_ranks_are_the_same(kind: str, tie_break: str) -> None:
    """A search sorts once (`sorted_ranks`) and compares per density: the same masks as selecting."""
    v = TENSORS[kind]
    n = v.numel()
    desc, asc = sorted_ranks(v, True, tie_break), sorted_ranks(v, False, tie_break)
    assert desc.dtype == torch.int32 and desc.shape == v.shape
    for k in (0, 1, n // 10, n // 2, n - 1, n):
        assert torch.equal(top_k_mask(v, k, desc), top_k_mask(v, k, tie_break=tie_break))
    for lo, hi in ((0, n // 4), (n // 3, n // 3 + 1), (n // 5, n - n // 7), (0, n)):
        assert torch.equal(rank_window_mask(v, lo, hi, asc), rank_window_mask(v, lo, hi, tie_break=tie_break))


def test_nan_sorts_as_in_mergekit() -> None:
    v = T([1.0, float("nan"), 0.5, 0.5, 2.0])
    for k in range(6):
        assert torch.equal(top_k_mask(v, k), mergekit_top_k(v, k))
        assert torch.equal(top_k_mask(v, k, sorted_ranks(v, True)), mergekit_top_k(v, k))
