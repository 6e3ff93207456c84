"""The losses against direct computations written from docs/reference.md §1-§2 (GroCo on top of diffsort)."""

import diffsort
import pytest
import torch
import torch.nn.functional as F

from model.loss import (
    GroCo,
    NT_Xent,
    NT_XentAllCombinations,
    NT_XentWithMoreNegatives,
    groco_loss,
)
from model.loss.ops import selected_weights, symmetric_products
from model.sorting import _layers, odd_even_wiring, relaxed_rank_mass, swap_wires, wiring


def relaxed_sort(scores: torch.Tensor, steepness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed ascending sort through `model.sorting`'s network, with the whole permutation matrix
    (the reference `relaxed_rank_mass` is checked against).

    Args:
        scores: `[B, n]` values to sort.
        steepness: inverse temperature s of the Cauchy relaxation.

    Returns:
        sorted: `[B, n]` relaxed sorted values (ascending).
        perm: `[B, n, n]`, `perm[b, i, j]` the relaxed probability that input i ends at rank j.
    """
    batch, n = scores.shape
    values = scores
    perm = torch.eye(n, dtype=scores.dtype, device=scores.device).expand(batch, n, n)
    for partner, weight, out in _layers(scores, steepness):
        # every input row's probabilities move between the compared ranks like the values do
        perm = torch.addcmul(perm, weight.unsqueeze(1), swap_wires(perm, partner) - perm)
        values = out
    return values, perm


def spec_groco(z, n_pos, k, s, stop_grad):
    """The GroCo loss step by step: full similarity matrix, top-k, diffsort's network, torch BCELoss."""
    bce = torch.nn.BCELoss()
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-8)
    total = 0
    for a in range(len(z)):
        anchor = z[a]
        positives = [z[p] for p in range(n_pos) if p != a]
        pos = torch.stack([cos(anchor, p.detach() if stop_grad else p) for p in positives], dim=1)
        normed = anchor / anchor.norm(dim=1, keepdim=True).clamp_min(1e-8)
        negatives = normed.detach() if stop_grad else normed
        sim = normed @ negatives.T
        sim = sim.masked_fill(torch.eye(len(anchor), dtype=torch.bool), -float("inf"))
        pos, _ = torch.sort(pos, dim=1)
        neg = torch.flip(torch.topk(sim, k, dim=1).values, dims=[1])
        scores = torch.cat((neg, pos), dim=1)
        n = scores.shape[1]
        sorter = diffsort.DiffSortNet("odd_even", n, steepness=s, distribution="cauchy")
        _, perm = sorter(scores)
        target = torch.eye(n).expand(len(anchor), n, n)
        pred_neg = perm[:, :, :k].sum(2, keepdim=True).clip(0, 1)
        pred_pos = perm[:, :, k:].sum(2, keepdim=True).clip(0, 1)
        target_neg = target[:, :, :k].sum(2, keepdim=True).clip(0, 1)
        target_pos = target[:, :, k:].sum(2, keepdim=True).clip(0, 1)
        total = total + (bce(pred_pos, target_pos) + bce(pred_neg, target_neg)) / 2
    return total / len(z)


def _views(n_views, batch=24, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=gen)
    return [(base + 0.8 * torch.randn(batch, dim, generator=gen)).requires_grad_() for _ in range(n_views)]


def _value_and_grads(fn, views):
    loss = fn(views)
    grads = torch.autograd.grad(loss, views)
    return loss.detach(), grads


@pytest.mark.parametrize("n_views,n_pos", [(2, 2), (3, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("stop_grad", [True, False])
def test_groco_equals_spec_definition(n_views, n_pos, stop_grad):
    views = _views(n_views)
    ours = GroCo(n_augs=n_views, n_pos_augs=n_pos, topk_neg=10, steepness=1.0, stop_grad=stop_grad)
    loss, grads = _value_and_grads(lambda v: ours(v)[0], views)
    ref_loss, ref_grads = _value_and_grads(lambda v: spec_groco(v, n_pos, 10, 1.0, stop_grad), views)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_groco_large_batch_equals_spec(stop_grad):
    """From batch 512 on the CPU the view's similarities to itself are computed by blocks
    (`symmetric_products`); the loss and gradients still equal `spec_groco`'s."""
    views = _views(2, batch=530, dim=16)
    ours = GroCo(n_augs=2, stop_grad=stop_grad)
    loss, grads = _value_and_grads(lambda v: ours(v)[0], views)
    ref_loss, ref_grads = _value_and_grads(lambda v: spec_groco(v, 2, 10, 1.0, stop_grad), views)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_symmetric_products_equal_the_full_product():
    x = torch.randn(1030, 24, dtype=torch.float64)
    torch.testing.assert_close(symmetric_products(x), x @ x.T)
    torch.testing.assert_close(symmetric_products(x[:3], blocks=4), x[:3] @ x[:3].T)


def test_groco_other_steepness_and_k():
    views = _views(2, batch=40)
    loss, grads = _value_and_grads(lambda v: GroCo(n_augs=2, topk_neg=5, steepness=4.0)(v)[0], views)
    ref_loss, ref_grads = _value_and_grads(lambda v: spec_groco(v, 2, 5, 4.0, True), views)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_groco_info_and_ordering_signal():
    """Well-separated positives give a lower loss and a positive pos-neg gap."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(32, 16, generator=gen)
    close = [base + 0.01 * torch.randn(32, 16, generator=gen) for _ in range(2)]
    far = [torch.randn(32, 16, generator=gen) for _ in range(2)]
    loss_close, info = GroCo(n_augs=2)(close)
    loss_far, _ = GroCo(n_augs=2)(far)
    assert loss_close < loss_far
    assert info["info_pos_neg_dist"] > 0
    assert set(info) == {"info_pos_max", "info_pos_min", "info_neg_max", "info_neg_min", "info_pos_neg_dist"}


def test_groco_rejects_small_batch_and_wrong_view_count():
    with pytest.raises(ValueError, match="global batch of at least 11"):
        GroCo(n_augs=2, topk_neg=10)(_views(2, batch=8))
    with pytest.raises(ValueError, match="expects 3 views"):
        GroCo(n_augs=3)(_views(2))
    with pytest.raises(ValueError, match="need 2 <= n_pos_augs <= n_augs, got n_pos_augs=1"):
        GroCo(n_augs=3, n_pos_augs=1)


def test_relaxed_sort_equals_diffsort():
    x = torch.randn(16, 12, dtype=torch.float64)
    sorter = diffsort.DiffSortNet("odd_even", 12, steepness=2.0, distribution="cauchy")
    sorter.sorting_network = [[m.double() for m in layer] for layer in sorter.sorting_network]
    ref_sorted, ref_perm = sorter(x)
    ours_sorted, ours_perm = relaxed_sort(x, 2.0)
    torch.testing.assert_close(ours_sorted, ref_sorted)
    torch.testing.assert_close(ours_perm, ref_perm)


@pytest.mark.parametrize("n,split", [(11, 10), (12, 10), (13, 4)])
def test_relaxed_rank_mass_equals_the_permutation_sums(n, split):
    x = torch.randn(32, n, dtype=torch.float64)
    _, perm = relaxed_sort(x, 1.5)
    below, above = relaxed_rank_mass(x, split, 1.5)
    torch.testing.assert_close(below, perm[:, :, :split].sum(2))
    torch.testing.assert_close(above, perm[:, :, split:].sum(2))


def test_sorting_network_gradients_pass_gradcheck():
    """The layers' gathers have a hand-written backward (`swap_wires`): checked against finite
    differences in float64, for the sorted values, the permutation and the rank masses."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: relaxed_sort(v, 1.5), (x,))
    assert torch.autograd.gradcheck(lambda v: relaxed_rank_mass(v, 5, 1.5), (x,))


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_sorting_network_has_the_eager_gradient():
    """torch.compile of the network (5 wires, as for 4 negatives and a positive: five layers) gives
    the eager gradient (the gathers have their own backward, not autograd's scatter-add)."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))

    def readout(v):
        below, above = relaxed_rank_mass(v, 4)
        return (below.clamp_min(1e-6).log() * torch.arange(5.0)).sum() + above.square().sum()

    leaf = x.clone().requires_grad_()
    eager = torch.autograd.grad(readout(leaf), leaf)[0]
    leaf = x.clone().requires_grad_()
    compiled = torch.autograd.grad(torch.compile(readout, fullgraph=True)(leaf), leaf)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_wiring_pairs_neighbours_like_the_odd_even_network():
    partner, sign = wiring(5, torch.device("cpu"), torch.float32)
    assert partner.tolist() == [[1, 0, 3, 2, 4], [0, 2, 1, 4, 3]] * 2 + [[1, 0, 3, 2, 4]]
    assert sign[:2].tolist() == [[-1, 1, -1, 1, 0], [0, -1, 1, -1, 1]]


def test_wiring_of_every_size_is_the_odd_even_network():
    for n in range(1, 20):
        partner, sign = odd_even_wiring(n)
        assert partner.shape == sign.shape == (n, n)
        for layer in range(n):
            pairs = [(i, i + 1) for i in range(layer % 2, n - 1, 2)]
            expected_partner, expected_sign = list(range(n)), [0.0] * n
            for low, high in pairs:
                expected_partner[low], expected_partner[high] = high, low
                expected_sign[low], expected_sign[high] = -1.0, 1.0
            assert partner[layer].tolist() == expected_partner, (n, layer)
            assert sign[layer].tolist() == expected_sign, (n, layer)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_groco_computes_only_on_the_inputs_device():
    """Traced from tensors on the meta device, every tensor of the compiled loss's forward and
    backward graphs is on that device. A tensor made on the CPU inside the graph (the sorting
    network's wiring once was) is a host computation and a blocking copy per call on a GPU, and
    keeps the loss out of CUDA graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    for n_views, n_pos in [(3, 3), (8, 2)]:
        z = torch.randn(n_views, 16, 32, device="meta", requires_grad=True)
        compiled = torch.compile(groco_loss, backend=backend, fullgraph=True)
        compiled(z, n_pos, 5, 1.0, True)[0].backward()
    assert len(graphs) == 4  # forward and backward, twice
    devices = {node.meta["val"].device.type for gm in graphs for node in gm.graph.nodes
               if isinstance(node.meta.get("val"), torch.Tensor)}
    assert devices == {"meta"}


def test_selected_weights_dense_equals_sparse():
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(6, 4, generator=gen)
    index = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(6)])
    dense = selected_weights(grad, index, 9, sparse=False)
    torch.testing.assert_close(selected_weights(grad, index, 9, sparse=True).to_dense(), dense)
    assert dense[2, index[2, 1]] == grad[2, 1] and (dense != 0).sum() == grad.numel()


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("stop_grad", [True, False])
def test_compiled_groco_is_one_graph_and_equals_spec(stop_grad):
    """fullgraph=True fails on any graph break, so the loss can run as one CUDA graph; compiled, the
    backward takes the dense-weights path, which must give `spec_groco`'s gradient too. Three views and
    4 negatives: every anchor sorts 6 scores, through six layers."""
    views = _views(3, batch=24)
    compiled = torch.compile(GroCo(n_augs=3, topk_neg=4, stop_grad=stop_grad), fullgraph=True)
    loss, grads = _value_and_grads(lambda v: compiled(v)[0], views)
    ref_loss, ref_grads = _value_and_grads(lambda v: spec_groco(v, 3, 4, 1.0, stop_grad), views)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def spec_nt_xent_more_negatives(z, temperature, stop_grad=False, topk_neg=None):
    """The NT-Xent baselines (docs/reference.md §2; 2 views: NT_Xent), one anchor row at a time."""
    batch = z[0].shape[0]
    cand = torch.cat(z, dim=0)
    cand = cand.detach() if stop_grad else cand
    losses = []
    for a in range(2):
        for i in range(batch):
            anchor = z[a][i]
            sims = F.cosine_similarity(anchor[None], cand, dim=1, eps=1e-8) / temperature
            pos_idx = (1 - a) * batch + i
            keep = [j for j in range(len(cand)) if j % batch != i or j == pos_idx]
            negs = torch.stack([sims[j] for j in keep if j != pos_idx])
            if topk_neg is not None:
                negs = negs.topk(topk_neg).values
            logits = torch.cat((sims[pos_idx][None], negs))
            losses.append(-F.log_softmax(logits, dim=0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("stop_grad,topk", [(False, None), (True, 10)])
def test_nt_xent(stop_grad, topk):
    views = _views(2)
    ours = NT_Xent(temperature=0.5, stop_grad=stop_grad, topk_neg=topk)
    loss, grads = _value_and_grads(lambda v: ours(v)[0], views)
    ref, ref_grads = _value_and_grads(lambda v: spec_nt_xent_more_negatives(v, 0.5, stop_grad, topk), views)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_nt_xent_more_negatives_and_all_combinations():
    views = _views(4)
    loss = NT_XentWithMoreNegatives(n_augs=4, temperature=0.1)(views)[0]
    torch.testing.assert_close(loss, spec_nt_xent_more_negatives(views, 0.1), rtol=1e-5, atol=1e-6)

    combos = NT_XentAllCombinations(n_augs=4, temperature=0.1, n_pos_augs=2)
    assert combos.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    expected = torch.stack([
        spec_nt_xent_more_negatives([views[n], views[m]] + [v for j, v in enumerate(views) if j not in (n, m)], 0.1)
        for n, m in combos.pairs()
    ]).mean()
    torch.testing.assert_close(combos(views)[0], expected, rtol=1e-5, atol=1e-6)
