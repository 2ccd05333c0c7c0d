"""BERT-EMD's many-to-many layer mapping: the exact transport plan, the loss, the weight update, training."""
import numpy as np
import pytest
import torch

from pykd.distill import config as run_config
from pykd.distill.losses import DistillationObjective, ForwardView, ModelShape
from pykd.distill.mapping import EarthMoverMapping, attention_pairs, hidden_pairs, transport_plan

scipy_optimize = pytest.importorskip("scipy.optimize")


def _masses(rng, size):
    mass = rng.uniform(0.1, 1.0, size)
    return mass / mass.sum()


@pytest.mark.parametrize("m, n", [(1, 1), (1, 5), (4, 1), (3, 6), (7, 5), (6, 12)])
def test_plan_meets_the_marginals(m, n):
    rng = np.random.default_rng(m * 100 + n)
    a, b = _masses(rng, m), _masses(rng, n)
    flow = transport_plan(a, b, rng.uniform(0.0, 3.0, (m, n)))
    assert (flow >= 0).all()
    np.testing.assert_allclose(flow.sum(1), a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flow.sum(0), b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m, n", [(2, 3), (5, 5), (4, 9), (9, 4)])
def test_plan_is_optimal_on_the_line(m, n):
    """Points on a line with cost |x - y|: the optimum is the integral of |F_a - F_b| (the CDFs)."""
    rng = np.random.default_rng(m + 10 * n)
    x, y = np.sort(rng.uniform(0, 5, m)), np.sort(rng.uniform(0, 5, n))
    a, b = _masses(rng, m), _masses(rng, n)
    flow = transport_plan(a, b, np.abs(x[:, None] - y[None, :]))
    points = np.sort(np.concatenate([x, y]))
    cdf_a = np.array([a[x <= t].sum() for t in points[:-1]])
    cdf_b = np.array([b[y <= t].sum() for t in points[:-1]])
    exact = float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))
    assert float((flow * np.abs(x[:, None] - y[None, :])).sum()) == pytest.approx(exact, rel=1e-9)


def test_plan_with_uniform_masses_is_the_optimal_assignment():
    """Equal uniform masses (Birkhoff): the optimum is a permutation, the linear assignment's."""
    rng = np.random.default_rng(5)
    cost = rng.uniform(0, 1, (7, 7))
    rows, cols = scipy_optimize.linear_sum_assignment(cost)
    flow = transport_plan(np.full(7, 1 / 7), np.full(7, 1 / 7), cost)
    assert float((flow * cost).sum()) == pytest.approx(cost[rows, cols].sum() / 7, rel=1e-9)


def test_plan_of_a_hand_solved_case():
    # Student layer 0 is cheap to move to teacher layer 0, layer 1 to teacher layer 2; teacher layer 1 costs
    # 1 from either: a = (1/2, 1/2), b = (1/4, 1/4, 1/2) -> F = [[1/4, 1/4, 0], [0, 0, 1/2]], EMD = 1/4.
    cost = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    flow = transport_plan([0.5, 0.5], [0.25, 0.25, 0.5], cost)
    np.testing.assert_allclose(flow, [[0.25, 0.25, 0.0], [0.0, 0.0, 0.5]], atol=1e-12)


def test_plan_of_masses_spanning_eight_orders_whose_totals_differ_by_one_rounding():
    # Teacher-layer weights a real run reached (chatterbot_topics, 3 x 6 layers): the totals differ by 1.1e-16
    # and HiGHS' presolve called the full (rank-deficient) system infeasible.
    a = np.array([0.2775065391356669, 0.2270529668197842, 0.49544049404454893])
    b = np.array([0.9999073476710264, 8.992120636186056e-05, 2.60383459373577e-06, 6.365233723066536e-08,
                  5.265057847696229e-08, 1.0985102219504978e-08])
    cost = np.array([[0.0807, 0.1470, 0.2324, 0.3594, 0.4513, 0.5629], [0.0995, 0.1390, 0.2094, 0.3698, 0.4695, 0.6034],
                     [0.2628, 0.2582, 0.2894, 0.3996, 0.3747, 0.4773]])
    assert a.sum() != b.sum()
    flow = transport_plan(a, b, cost)
    assert (flow >= 0).all()
    np.testing.assert_allclose(flow.sum(1), a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flow.sum(0), b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("a, b, cost, message", [
    ([0.5, 0.5], [0.3, 0.3], [[1, 1], [1, 1]], "equal totals"),
    ([-0.5, 1.5], [1.0], [[1], [1]], "non-negative masses"),
    ([1.0], [1.0], [[np.nan]], "finite costs"),
    ([1.0, 0.0], [1.0], [[1, 1]], r"shapes \(2,\), \(1,\), \(1, 2\)"),
    ([0.5, 0.5], [1.0, np.nan], [[1, 1], [1, 1]], r"finite target masses, got \[1.0, nan\]"),
    ([np.nan, 1.0], [0.5, 0.5], [[1, 1], [1, 1]], r"finite source masses, got \[nan, 1.0\]"),
    ([np.inf, 1.0], [np.inf, 1.0], [[1, 1], [1, 1]], r"finite source masses, got \[inf, 1.0\]"),
])
def test_plan_rejects_bad_input(a, b, cost, message):
    with pytest.raises(ValueError, match=message):
        transport_plan(a, b, cost)


def test_emd_loss_gradient_is_the_flow_and_weights_follow_cost_attention():
    mapping = EarthMoverMapping(3, 5, temperature=0.7).double()
    costs = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    costs.requires_grad_()
    a, b = mapping.student_weights.clone().numpy(), mapping.teacher_weights.clone().numpy()
    flow = transport_plan(a, b, costs.detach().numpy())
    loss = mapping(costs)
    loss.backward()
    np.testing.assert_allclose(costs.grad.numpy(), flow, atol=1e-12)  # D enters linearly, F held fixed
    assert float(loss.detach()) == pytest.approx(float((flow * costs.detach().numpy()).sum()), rel=1e-12)
    # The update, written out from BERT-EMD's formula in float64.
    transfer = flow * costs.detach().numpy()
    for weights, before, spent in ((mapping.student_weights, a, transfer.sum(1)),
                                   (mapping.teacher_weights, b, transfer.sum(0))):
        unit = spent / before
        ratio = unit.sum() / unit / 0.7
        np.testing.assert_allclose(weights.numpy(), np.exp(ratio - ratio.max()) / np.exp(ratio - ratio.max()).sum(),
                                   rtol=1e-12)
        assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)


def test_emd_weights_move_to_cheap_layers_and_stay_put_outside_training():
    mapping = EarthMoverMapping(2, 4)
    costs = torch.tensor([[0.1, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        mapping(costs)
    assert torch.equal(mapping.student_weights, torch.full((2,), 0.5, dtype=torch.float64))
    mapping.eval()
    mapping(costs)
    assert torch.equal(mapping.student_weights, torch.full((2,), 0.5, dtype=torch.float64))
    mapping.train()
    mapping(costs)
    assert mapping.student_weights[0] > 0.99  # ratios 11 vs 1.1: softmax puts nearly all weight on layer 0
    free = EarthMoverMapping(2, 2)
    free(torch.tensor([[0.0, 1.0], [1.0, 2.0]]))  # a layer pair at zero cost: finite weights, no NaN
    assert torch.isfinite(free.student_weights).all() and torch.isfinite(free.teacher_weights).all()
    free(torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    assert torch.isfinite(free.student_weights).all()
    with pytest.raises(ValueError, match=r"must be \(student layers, teacher layers\) = \(2, 2\), got \(2, 3\)"):
        free(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        EarthMoverMapping(2, 2, temperature=0)
    for layers, message in (((0, 3), "student_layers must be a positive int, got 0"),
                            ((3, 0), "teacher_layers must be a positive int, got 0"),
                            ((2.5, 3), "student_layers must be a positive int, got 2.5"),
                            ((3, True), "teacher_layers must be a positive int, got True")):
        with pytest.raises(ValueError, match=message):
            EarthMoverMapping(*layers)


def test_emd_mappings_pair_every_layer():
    assert hidden_pairs("emd", 2, 3) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert hidden_pairs("emd", 1, 2, include_embeddings=True) == [(0, 0), (1, 1), (1, 2)]
    assert attention_pairs("emd", 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def _view(gen, layers, hidden, heads, mask):
    from pykd.capture import LayerCapture

    batch, length = mask.shape
    states = tuple(torch.randn(batch, length, hidden, generator=gen, dtype=torch.float64)
                   for _ in range(layers + 1))
    captured = [LayerCapture(*(torch.randn(batch, heads, length, hidden // heads, generator=gen, dtype=torch.float64)
                               for _ in range(3))) for _ in range(layers)]
    return ForwardView(None, states, captured, mask)


def test_emd_terms_equal_the_transport_of_the_pair_losses():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    teacher, student = _view(gen, 4, 12, 2, mask), _view(gen, 3, 12, 2, mask)
    config = run_config.from_dict({"data": {"kind": "unlabeled"}, "losses": {
        "prediction": {"type": "none"}, "hidden": {"mapping": "emd", "include_embeddings": True},
        "relation": {"mapping": "emd", "relations": ["qk"], "relation_heads": 2}}}).losses
    objective = DistillationObjective(config, ModelShape(4, 12), ModelShape(3, 12), "unlabeled").double()
    student.hidden_states = tuple(h.requires_grad_() for h in student.hidden_states)
    terms, total = objective(teacher, student)
    total.backward()

    def mse(t, s):
        per_token = (student.hidden_states[s].detach() - teacher.hidden_states[t]).pow(2).mean(-1)
        return float(torch.stack([per_token[b][mask[b]].mean() for b in range(2)]).mean())

    costs = np.array([[mse(t, s) for t in range(1, 5)] for s in range(1, 4)])
    expected = (transport_plan(np.full(3, 1 / 3), np.full(4, 1 / 4), costs) * costs).sum() + mse(0, 0)
    assert float(terms["hidden"]) == pytest.approx(expected, rel=1e-5)  # the hidden term computes in fp32
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in student.hidden_states)
    assert float(objective.hidden.emd.student_weights.sum()) == pytest.approx(1.0)
    assert not torch.equal(objective.relation.emd.student_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    state = objective.state_dict()
    assert {"hidden.emd.student_weights", "relation.emd.teacher_weights"} <= set(state)


def test_mi_refuses_the_emd_mapping():
    config = run_config.from_dict({"losses": {"mi": {"bound": "alpha", "mapping": "emd"}}}).losses
    with pytest.raises(ValueError, match="losses.mi.mapping emd is not supported"):
        DistillationObjective(config, ModelShape(4, 12), ModelShape(2, 12), "classification")


def test_a_distillation_run_with_emd_mappings_trains_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    from tests.kd_fixtures import tiny_csv, tiny_teacher

    from pykd.distill.trainer import Trainer

    values = {"teacher": {"path": tiny_teacher(tmp_path, layers=3)},
              "data": {"dataset": tiny_csv(tmp_path, rows=40), "kind": "unlabeled", "max_length": 16},
              "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 32},
              "losses": {"prediction": {"type": "none"}, "hidden": {"mapping": "emd"},
                         "relation": {"mapping": "emd", "relation_heads": 2}},
              "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 100, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp_path / "run"), "progress": False}}
    trainer = Trainer(run_config.from_dict(values), "distill")
    history = trainer.train(stop_after=2)
    weights = trainer.step_module.objective.hidden.emd.student_weights.clone()
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
    assert not torch.equal(weights, torch.full((2,), 0.5, dtype=torch.float64))
    resumed = Trainer(run_config.from_dict(values), "distill")
    resumed.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert torch.equal(resumed.step_module.objective.hidden.emd.student_weights, weights)
    resumed.train()
    assert resumed.step == 4
