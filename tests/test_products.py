"""Every exact quantity against the independent dense torch.func reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from conftest import LOSSES, MODELS, Case, Reference, make_case, rel_err

import hesse

TOL64 = 1e-10
BATCHES = [3, 1, 3]  # unequal batch sizes, summing to the 7 samples of every case


@pytest.fixture(
    scope="module",
    params=[(m, lo) for m in MODELS for lo in LOSSES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def setting(request):
    name, loss = request.param
    case = make_case(name, loss, seed=hash((name, loss)) % 1000)
    ref = Reference(case)
    prob = hesse.Problem(case.model, case.loss_fn, case.batches(BATCHES))
    return case, ref, prob


def _vecs(prob: hesse.Problem, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(prob.num_params, k, generator=g)


def test_gradient(setting):
    _, ref, prob = setting
    assert rel_err(hesse.gradient(prob), ref.gradient()) < TOL64


def test_hessian_dense(setting):
    _, ref, prob = setting
    assert rel_err(hesse.hessian(prob), ref.hessian()) < TOL64


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_hvp_vector_and_matrix(setting, method):
    _, ref, prob = setting
    H = ref.hessian()
    V = _vecs(prob, 3, 1)
    assert rel_err(hesse.hvp(prob, V[:, 0], method=method), H @ V[:, 0]) < TOL64
    assert rel_err(hesse.hvp(prob, V, method=method), H @ V) < TOL64


def test_ggn(setting):
    _, ref, prob = setting
    G = ref.ggn()
    V = _vecs(prob, 2, 2)
    assert rel_err(hesse.ggn_vp(prob, V[:, 0]), G @ V[:, 0]) < TOL64  # forward-mode path
    assert rel_err(hesse.ggn_vp(prob, V), G @ V) < TOL64  # batched double-vjp path
    assert rel_err(hesse.ggn(prob), G) < TOL64


def test_decompose_adds_up(setting):
    _, ref, prob = setting
    d = hesse.decompose(prob)
    H, G, R = ref.hessian(), ref.ggn(), ref.residual()
    assert rel_err(d.hessian, H) < TOL64
    assert rel_err(d.ggn, G) < TOL64
    assert rel_err(d.residual, R) < TOL64
    assert rel_err(d.ggn + d.residual, H) < TOL64
    norms = d.block_norms(prob)
    assert set(norms) == set(prob.names)
    layers, counts, blocks = d.layer_blocks(prob)
    groups = {}
    for name, sl in prob.slices.items():
        groups.setdefault(name.rsplit(".", 1)[0], []).extend(range(sl.start, sl.stop))
    assert layers == list(groups) and counts == [len(v) for v in groups.values()]
    for a, ia in enumerate(groups.values()):
        for b, ib in enumerate(groups.values()):
            ref = float(H[ia][:, ib].norm())
            assert abs(float(blocks["hessian"][a, b]) - ref) <= 1e-10 * max(ref, 1.0)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_fisher(setting, kind):
    _, ref, prob = setting
    F = ref.true_fisher() if kind == "true" else ref.empirical_fisher()
    op = hesse.FisherOperator(prob, kind=kind)
    V = _vecs(prob, 2, 3)
    assert rel_err(op @ V[:, 0], F @ V[:, 0]) < TOL64
    assert rel_err(hesse.fisher_vp(prob, V, kind=kind), F @ V) < TOL64
    assert rel_err(op.to_dense(), F) < TOL64


def test_true_fisher_equals_ggn_for_ce():
    case = make_case("mlp-tanh", "ce", seed=11)
    ref = Reference(case)
    assert rel_err(ref.true_fisher(), ref.ggn()) < 1e-12  # the enumeration is independent


def test_jacobian(setting):
    _, ref, prob = setting
    assert rel_err(hesse.jacobian(prob), ref.jacobian()) < TOL64


def test_operator_interface(setting):
    _case, ref, prob = setting
    H = ref.hessian()
    op = hesse.HessianOperator(prob)
    assert op.shape == (prob.num_params, prob.num_params)
    assert op.dtype == torch.float64 and op.symmetric and not op.psd
    assert hesse.GGNOperator(prob).psd
    # per-parameter lists in, per-parameter lists out
    v = _vecs(prob, 1, 4)[:, 0]
    out = op @ prob.unflatten(v)
    assert isinstance(out, list) and [o.shape for o in out] == [torch.Size(s) for s in prob.shapes]
    assert rel_err(prob.flatten(out), H @ v) < TOL64
    # blocks
    a, b = prob.names[0], prob.names[-1]
    blk = op.block(a, b)
    assert blk.shape == (*prob.shapes[0], *prob.shapes[-1])
    assert (
        rel_err(blk.reshape(prob.sizes[0], prob.sizes[-1]), H[prob.slices[a], prob.slices[b]])
        < TOL64
    )
    # tiny memory budget: one column per chunk, same result
    assert rel_err(op.to_dense(chunk_memory=1), H) < TOL64
    # the former name of chunk_memory still works, with a warning; both at once is refused
    with pytest.warns(DeprecationWarning, match="chunk_memory"):
        assert rel_err(op.to_dense(max_memory=1), H) < TOL64
    with pytest.raises(TypeError, match="chunk_memory= only"):
        op.to_dense(chunk_memory=1, max_memory=1)


def test_scipy_export(setting):
    _, ref, prob = setting
    H = ref.hessian().numpy()
    lin = hesse.HessianOperator(prob).to_scipy()
    x = np.random.default_rng(0).standard_normal(prob.num_params)
    assert np.allclose(lin @ x, H @ x, rtol=0, atol=1e-12 * np.abs(H).max())
    top = sla.eigsh(lin, k=2, which="LA", v0=x, return_eigenvectors=False)  # fixed start
    assert np.allclose(np.sort(top), np.linalg.eigvalsh(H)[-2:], rtol=1e-8)
    # conjugate gradients on the (PSD) GGN plus damping
    G = ref.ggn().numpy() + np.eye(prob.num_params)
    glin = hesse.GGNOperator(prob).to_scipy() + sla.aslinearoperator(np.eye(prob.num_params))
    sol, info = sla.cg(glin, x, rtol=1e-12, maxiter=2000)
    assert info == 0 and np.allclose(sol, np.linalg.solve(G, x), rtol=1e-8, atol=1e-10)


def test_operator_algebra(setting):
    """Sums, scalings and shifts of operators (design note, "The operator algebra") equal
    the same combinations of the dense references; the results are operators again."""
    _, ref, prob = setting
    H, G = ref.hessian(), ref.ggn()
    P = prob.num_params
    Id = torch.eye(P, dtype=torch.float64)
    V = _vecs(prob, 3, 7)
    hop, gop = hesse.HessianOperator(prob), hesse.GGNOperator(prob)
    A = 2 * hop - gop / 4 + 0.5
    assert isinstance(A, hesse.CurvatureOperator) and A.shape == (P, P) and not A.psd
    assert rel_err(A.to_dense(), 2 * H - G / 4 + 0.5 * Id) < TOL64
    assert rel_err((1.0 - hop) @ V, V - H @ V) < TOL64 and rel_err((-gop) @ V, -G @ V) < TOL64
    # a damping in any form the engines take: a dict per tensor, a (P,) tensor, a sequence
    values = {n: 0.5 + i for i, n in enumerate(prob.names)}
    D = torch.cat(
        [torch.full((s,), values[n]) for n, s in zip(prob.names, prob.sizes, strict=True)]
    )
    for damping in (values, D, [values[n] for n in prob.names]):
        B = gop + damping
        assert B.psd and rel_err(B @ V, G @ V + D[:, None] * V) < TOL64
    assert rel_err((gop + values).diagonal(), G.diagonal() + D) < TOL64
    # shifts merge, zeros in a diagonal are allowed (an L2 term on some tensors only)
    Z = D.clone()
    Z[: prob.sizes[0]] = 0.0
    assert rel_err(((hop + Z) + 1.0) @ V, H @ V + Z[:, None] * V + V) < TOL64
    # products on lists, scipy and the inverse
    out = A @ prob.unflatten(V[:, 0])
    assert rel_err(prob.flatten(out), (2 * H - G / 4 + 0.5 * Id) @ V[:, 0]) < TOL64
    x = V[:, 1].numpy()
    sol, info = sla.cg((gop + 1.0).to_scipy(), x, rtol=1e-12, maxiter=2000)
    assert info == 0 and np.allclose(
        sol, np.linalg.solve((G + Id).numpy(), x), rtol=1e-8, atol=1e-10
    )
    inv = hesse.factorize(prob, 1.0, "ggn").inverse()
    assert rel_err((inv + gop) @ V, torch.linalg.solve(G + Id, V) + G @ V) < 1e-9
    # refused: another problem's parameters, a non-finite scale, a wrong shape, a string
    other = hesse.Problem(
        torch.nn.Linear(2, 1).double(), torch.nn.MSELoss(), (torch.ones(3, 2), torch.ones(3, 1))
    )
    with pytest.raises(ValueError, match="different parameters"):
        hop + hesse.HessianOperator(other)
    with pytest.raises(ValueError, match="finite"):
        hop * float("nan")
    with pytest.raises(ValueError, match="shape"):
        hop + torch.ones(P + 1)
    with pytest.raises(ValueError, match="finite"):
        hop + {n: float("inf") for n in prob.names}
    with pytest.raises(TypeError):
        hop + "1"


def test_an_operator_without_a_problem():
    """The operator base needs no `Problem` (design note, "The operator algebra"): an
    operator from a symmetric matrix or a function, over vectors split into named tensors
    of odd shapes, takes ``@`` on flat vectors, matrices and lists, blocks, the diagonal,
    the algebra, scipy and the spectral methods, each equal to the dense reference; it
    adds to a problem's operator over the same shapes, and bad input is refused."""
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (3, 4), "b": (1,)}
    P = 13
    R = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = R + R.T  # indefinite
    V = torch.randn(P, 5, generator=g, dtype=torch.float64)
    ops = [
        hesse.CurvatureOperator.from_matmat(A, shapes),
        hesse.CurvatureOperator.from_matmat(lambda X: A @ X, shapes, dtype=torch.float64),
    ]
    for op in ops:
        assert op.problem is None and op.shape == (P, P) and op.dtype == torch.float64
        assert rel_err(op @ V, A @ V) < TOL64 and rel_err(op @ V[:, 0], A @ V[:, 0]) < TOL64
        w, b = op @ [V[:12, 0].reshape(3, 4), V[12:, 0]]
        assert w.shape == (3, 4) and b.shape == (1,)
        assert rel_err(torch.cat([w.reshape(-1), b]), A @ V[:, 0]) < TOL64
        assert rel_err(op.to_dense(chunk_memory=1), A) < TOL64
        assert rel_err(op.block("w", "b").reshape(12, 1), A[:12, 12:]) < TOL64
        assert rel_err(op.diagonal(), A.diagonal()) < TOL64
        B = 2 * op - 1.0 + {"w": 0.5, "b": 3.0}
        D = torch.tensor([0.5] * 12 + [3.0], dtype=torch.float64)
        assert rel_err(B.to_dense(), 2 * A - torch.eye(P, dtype=torch.float64) + D.diag()) < TOL64
        assert B.problem is None
        ev = torch.linalg.eigvalsh(A)
        top = hesse.eigs(op, 2, generator=torch.Generator().manual_seed(1)).eigenvalues
        assert rel_err(top.sort().values, ev[-2:]) < 1e-9
        assert rel_err(hesse.eigvalsh(op), ev) < TOL64
        exact = hesse.trace(op, method="exact").estimate
        assert abs(exact - float(A.trace())) <= 1e-12 * float(A.abs().sum())
        x = V[:, 1].numpy()
        shift = 1.0 - float(ev[0])  # A + shift I: positive definite
        sol, info = sla.cg((op + shift).to_scipy(), x, rtol=1e-12, maxiter=500)
        want = np.linalg.solve((A + shift * torch.eye(P, dtype=torch.float64)).numpy(), x)
        assert info == 0 and np.allclose(sol, want, rtol=1e-8, atol=1e-10)
    # one flat tensor without names; a problem's operator over the same shapes adds to it
    flat = hesse.CurvatureOperator.from_matmat(A)
    assert flat.space.names == ["x"] and rel_err(flat @ V, A @ V) < TOL64
    model = torch.nn.Linear(4, 3).double()
    prob = hesse.Problem(
        model,
        torch.nn.MSELoss(),
        (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.ones(6, 3)),
    )
    prior = hesse.CurvatureOperator.from_matmat(
        torch.eye(15, dtype=torch.float64) * 2.0, dict(zip(prob.names, prob.shapes, strict=True))
    )
    H = hesse.hessian(prob)
    both = hesse.HessianOperator(prob) + prior
    assert both.problem is prob and rel_err(both.to_dense(), H + 2 * torch.eye(15)) < TOL64
    with pytest.raises(ValueError, match="different parameters"):
        hesse.HessianOperator(prob) + hesse.CurvatureOperator.from_matmat(torch.eye(15))
    # refused: no problem and no shapes, a non-square matrix, shapes that do not fit it, a
    # function without shapes, a product of the wrong shape, a problem with shapes
    with pytest.raises(TypeError, match="needs a hesse.Problem or shapes"):
        hesse.CurvatureOperator()
    with pytest.raises(ValueError, match="square"):
        hesse.CurvatureOperator.from_matmat(torch.ones(3, 4))
    with pytest.raises(ValueError, match="hold 4 entries"):
        hesse.CurvatureOperator.from_matmat(torch.eye(3), {"a": (2, 2)})
    with pytest.raises(TypeError, match="needs shapes"):
        hesse.CurvatureOperator.from_matmat(lambda X: X)
    bad = hesse.CurvatureOperator.from_matmat(lambda X: X[:2], 3)
    with pytest.raises(ValueError, match=r"took a \(3, 1\) matrix to \(2, 1\)"):
        bad @ torch.ones(3)
    with pytest.raises(ValueError, match="at least 1"):
        hesse.CurvatureOperator.from_matmat(lambda X: X, 0)
    with pytest.raises(TypeError, match="the problem's"):
        hesse.CurvatureOperator(prob, shapes=3)


def test_hessian_blocks(setting):
    _, ref, prob = setting
    H = ref.hessian()
    diag = hesse.hessian_blocks(prob)
    assert list(diag) == [(n, n) for n in prob.names]
    for (a, _), blk in diag.items():
        sl = prob.slices[a]
        assert rel_err(blk.reshape(sl.stop - sl.start, -1), H[sl, sl]) < TOL64
    full = hesse.hessian_blocks(prob, "all")
    rebuilt = torch.cat(
        [
            torch.cat(
                [
                    full[(a, b)].reshape(prob.slices[a].stop - prob.slices[a].start, -1)
                    for b in prob.names
                ],
                1,
            )
            for a in prob.names
        ],
        0,
    )
    assert rel_err(rebuilt, H) < TOL64


@pytest.mark.parametrize("name", ["mlp-tanh", "cnn", "rnn"])
def test_float32_matches_float64_reference(name):
    case64 = make_case(name, "ce", seed=5)
    ref = Reference(case64)
    H = ref.hessian()
    G = ref.ggn()
    case32 = make_case(name, "ce", seed=5, dtype=torch.float32)
    prob = hesse.Problem(case32.model, case32.loss_fn, case32.batches(BATCHES))
    v = _vecs(prob, 1, 6)[:, 0]
    assert prob.dtype == torch.float32
    assert hesse.hvp(prob, v.float()).dtype == torch.float32
    assert rel_err(hesse.hvp(prob, v.float()), H @ v) < 1e-5
    assert rel_err(hesse.ggn_vp(prob, v.float()), G @ v) < 1e-5
    assert rel_err(hesse.hessian(prob), H) < 1e-5


def test_param_subset_is_the_submatrix():
    case = make_case("mlp-tanh", "mse", seed=3)
    names = ["0.weight", "4.bias"]
    full = Reference(case).hessian()
    prob_full = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    idx = torch.cat(
        [torch.arange(prob_full.slices[n].start, prob_full.slices[n].stop) for n in names]
    )
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y), params=names)
    assert prob.names == names
    assert rel_err(hesse.hessian(prob), full[idx][:, idx]) < TOL64
    # selecting by tensor gives the same
    named = dict(case.model.named_parameters())
    prob_t = hesse.Problem(
        case.model, case.loss_fn, (case.X, case.y), params=[named["4.bias"], named["0.weight"]]
    )
    assert prob_t.names == names  # named_parameters() order, whatever the order given


def test_sum_reduction_and_batches():
    case = make_case("mlp-softplus", "mse", seed=4)
    case.loss_fn = torch.nn.MSELoss(reduction="sum")
    H = Reference(case).hessian()
    prob = hesse.Problem(case.model, case.loss_fn, case.batches([2, 5]))
    assert rel_err(hesse.hessian(prob), H) < TOL64
    assert rel_err(prob.loss(), Reference(case).loss(Reference(case).theta0)) < 1e-14


def test_empirical_fisher_diagonal_from_per_sample_gradients(setting):
    _, ref, prob = setting
    from hesse._spectral.stochastic import empirical_fisher_diagonal

    assert rel_err(empirical_fisher_diagonal(prob), torch.diagonal(ref.empirical_fisher())) < TOL64


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_public_loss_and_gradient_over_unequal_batches(loss):
    case = make_case("mlp-tanh", loss, seed=4)
    ref = Reference(case)
    prob = hesse.Problem(case.model, case.loss_fn, case.batches([3, 4]))
    value, g = hesse.loss_and_gradient(prob)
    assert value.ndim == 0 and g.shape == (prob.num_params,)
    assert rel_err(value, ref.loss(ref.theta0)) < 1e-12
    assert rel_err(g, ref.gradient()) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fisher_honours_ignore_index(reduction):
    """Cross-entropy ignores samples whose target is ``ignore_index`` (and ``"mean"``
    divides by the others only): the true Fisher equals the GGN of that loss (autodiff),
    the empirical Fisher equals ``c sum_valid g_n g_n^T`` from per-sample gradients, and
    the vmapped empirical Fisher diagonal agrees."""
    from torch.func import functional_call, grad, vmap

    from hesse._spectral.stochastic import empirical_fisher_diagonal

    g = torch.Generator().manual_seed(11)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    y[[1, 4, 5]] = -100
    lf = torch.nn.CrossEntropyLoss(reduction=reduction)
    prob = hesse.Problem(model, lf, (X, y))
    G = hesse.ggn(prob)
    F = hesse.FisherOperator(prob).to_dense()
    assert rel_err(F, G) < TOL64
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss_i(ps, x, t):
        o = functional_call(model, dict(zip(names, ps, strict=True)), (x[None],))
        return torch.nn.functional.cross_entropy(o, t[None], reduction="sum", ignore_index=-100)

    gs = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, X, y)
    J = torch.cat([gg.reshape(9, -1) for gg in gs], 1)  # (n, P), zero rows for ignored
    c = 1.0 if reduction == "sum" else 1.0 / int((y != -100).sum())
    ref = c * J.T @ J
    assert rel_err(hesse.FisherOperator(prob, kind="empirical").to_dense(), ref) < TOL64
    assert rel_err(empirical_fisher_diagonal(prob), torch.diagonal(ref)) < TOL64


def _autodiff_output_hessian_product(lf, o, t, w, U):
    """``Lambda U`` by a double backward through the loss (the reference)."""
    oo = o.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lf(oo, t) * w, [oo], create_graph=True)
    return torch.stack([torch.autograd.grad(g, [oo], u, retain_graph=True)[0] for u in U])


@pytest.mark.parametrize(
    "which",
    [
        "ce-labels",
        "ce-sum",
        "ce-ignore",
        "ce-soft",
        "mse",
        "mse-sum",
        "bce",
        "ce-smoothing",
        "ce-weights",
        "bce-pos-weight",
    ],
)
def test_the_loss_hessian_in_closed_form_equals_autodiff(which):
    """The Gauss-Newton products take cross-entropy's, MSE's and BCE's ``Lambda`` in
    closed form; where a loss has options the closed form does not cover, autodiff."""
    from torch import nn

    from hesse._autodiff import losses

    g = torch.Generator().manual_seed(7)
    n, C = 6, 4
    o = torch.randn(n, C, generator=g, dtype=torch.float64)
    U = torch.randn(3, n, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=g)
    probs = torch.rand(n, C, generator=g, dtype=torch.float64)
    lf, t = {
        "ce-labels": (nn.CrossEntropyLoss(), labels),
        "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), labels),
        "ce-ignore": (nn.CrossEntropyLoss(ignore_index=2), torch.tensor([2, 1, 2, 0, 3, 1])),
        "ce-soft": (nn.CrossEntropyLoss(), 2.0 * probs),  # unnormalised: mass != 1
        "mse": (nn.MSELoss(), probs),
        "mse-sum": (nn.MSELoss(reduction="sum"), probs),
        "bce": (nn.BCEWithLogitsLoss(), probs),
        "ce-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.1), labels),
        "ce-weights": (nn.CrossEntropyLoss(weight=torch.rand(C, dtype=torch.float64)), labels),
        "bce-pos-weight": (
            nn.BCEWithLogitsLoss(pos_weight=torch.rand(C, dtype=torch.float64)),
            probs,
        ),
    }[which]
    closed = losses._likelihood_hessian_product(lf, o, t, 0.3, U)
    covered = which not in ("ce-smoothing", "ce-weights", "bce-pos-weight")
    assert (closed is not None) == covered
    ref = _autodiff_output_hessian_product(lf, o, t, 0.3, U)
    got = losses.output_hessian_product(lf, o, t, 0.3, U)
    assert rel_err(got, ref) < 1e-13


def test_a_module_used_twice_and_hooks_leave_the_model_and_the_products_as_they_are():
    """One ``nn.Linear`` at two places: torch's ``functional_call`` would leave a detached
    copy in the model in place of the user's parameter (the user's optimiser would then
    train a tensor the model no longer uses). A gradient hook on a parameter does not
    enter hesse's derivatives, and a parameter assigned after the problem was built does
    not silently zero them: the products are those of the problem's tensors."""
    from torch import nn

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    held = [(m, name, t) for m in model.modules() for name, t in m._parameters.items()]
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    ref = Reference(Case("shared", model, X, y, nn.CrossEntropyLoss()))
    H, grad0 = ref.hessian(), ref.gradient()
    for m, name, t in held:  # (the reference runs torch's functional_call: put them back)
        m._parameters[name] = t
    V = _vecs(prob, 2, 3).double()
    hesse.gradient(prob), hesse.hvp(prob, V), hesse.ggn_vp(prob, V[:, 0]), hesse.hessian(prob)
    hesse.per_sample_gradients(prob)
    assert all(m._parameters[name] is t for m, name, t in held)
    assert rel_err(hesse.hvp(prob, V), H @ V) < TOL64

    handle = model[4].weight.register_hook(lambda gr: 10.0 * gr)
    assert rel_err(hesse.gradient(prob), grad0) < TOL64
    assert rel_err(hesse.hvp(prob, V), H @ V) < TOL64
    handle.remove()

    own = model[4].weight
    model[4].weight = nn.Parameter(own.detach() + 1.0)  # assigned after the problem
    assert rel_err(hesse.gradient(prob), grad0) < TOL64
    assert rel_err(hesse.hvp(prob, V), H @ V) < TOL64
