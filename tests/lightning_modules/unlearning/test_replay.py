"""``replay`` (lightning_modules/unlearning/replay.py) against a dense reference: torch.optim.Adam on a copy of
the model, fed the same minibatches (the revised samples and the replayed unchanged ones), with the L2 term as
an explicit penalty; in one process and as two ranks whose sums go through a reduce (threads stand in for the
processes, so the test needs no process group)."""

import copy
import math
import threading

import pytest
import torch

from veil.errors import ConfigError
from veil.lightning_modules.models.classifier import AttributeClassifier, attribute_bce
from veil.lightning_modules.unlearning import influence as U
from veil.lightning_modules.unlearning.replay import replay_descent
from veil.lightning_modules.unlearning_module import FeatureUnlearningModule, Processes

pytestmark = pytest.mark.usefixtures("single_thread")
L2 = {"head.weight": 0.01, "head.bias": 0.01}


def _model(seed=0):
    torch.manual_seed(seed)
    return AttributeClassifier(num_attributes=3, resolution=8, channels=(4, 8), feature_dim=8,
                              norm_num_groups=2).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    a = torch.randint(0, 2, (n, 3), generator=g).double() * 2 - 1
    return x, a


def _draws(m, n_pool, k, steps, passes, seed, rank):
    """The minibatches replay_descent takes on one rank: per pass, (revised rows, pool rows) of each step."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(passes):
        pick = torch.randperm(n_pool, generator=gen)[:k]
        order = torch.randperm(m + k, generator=gen)
        out.append([(idx[idx < m], pick[idx[idx >= m] - m]) for idx in order.tensor_split(steps)])
    return out


def _reference(model, shards, *, passes, lr, ratio, batch_size, seed):
    """torch.optim.Adam on a copy: each step the union over ranks of their minibatch, mean loss + L2 penalty."""
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    m = sum(len(s["revised"][0]) for s in shards)
    ks = [min(len(s["pool"][0]), round(ratio * len(s["revised"][0]))) for s in shards]
    steps = max(1, math.ceil((m + sum(ks)) / batch_size))
    draws = [_draws(len(s["revised"][0]), len(s["pool"][0]), k, steps, passes, seed, r)
             for r, (s, k) in enumerate(zip(shards, ks))]
    for p in range(passes):
        for step in range(steps):
            xs, as_ = [], []
            for s, d in zip(shards, draws):
                new_rows, pool_rows = d[p][step]
                xs += [s["revised"][0][new_rows], s["pool"][0][pool_rows]]
                as_ += [s["revised"][1][new_rows], s["pool"][1][pool_rows]]
            x, a = torch.cat(xs), torch.cat(as_)
            opt.zero_grad()
            penalty = sum(0.5 * L2.get(n, 0.0) * (q ** 2).sum() for n, q in ref.named_parameters())
            (attribute_bce(ref(x), a).sum() / max(len(x), 1) + penalty).backward()
            opt.step()
    return torch.cat([q.detach().flatten() for q in ref.parameters()])


def _objective(model):
    return U.Objective(model, [n for n, _ in model.named_parameters()], attribute_bce, L2)


def test_one_process_is_adam_on_the_revised_samples_and_a_fresh_replay_each_pass():
    model = _model()
    revised, pool = _data(10, 1), _data(40, 2)
    knobs = dict(passes=3, lr=0.01, replay_ratio=1.5, batch_size=8, seed=4)
    obj = _objective(model)
    new, info = replay_descent(obj, obj.flat(), revised=revised, pool=pool, **knobs)
    expected = _reference(model, [{"revised": revised, "pool": pool}], passes=3, lr=0.01, ratio=1.5,
                          batch_size=8, seed=4)
    assert info["steps"] == 3 * math.ceil((10 + 15) / 8) and info["replayed_per_pass"] == 15
    assert (new - obj.flat()).norm() > 1e-2  # it moved
    torch.testing.assert_close(new, expected, rtol=1e-7, atol=1e-8)  # fp64; a wrong batch or step is off by >1e-3


def test_two_ranks_take_the_steps_of_their_union():
    model = _model(1)
    shards = [{"revised": _data(7, 10 + r), "pool": _data(30, 20 + r)} for r in (0, 1)]
    knobs = dict(passes=2, lr=0.02, replay_ratio=1.0, batch_size=6, seed=3)
    barrier, box, results = threading.Barrier(2), [None, None], [None, None]

    def reduce_for(rank):
        def reduce(t):  # both ranks' tensors added in rank order: what _sum_over_ranks does over a process group
            box[rank] = t.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            return total
        return reduce

    def run(rank):
        mine = copy.deepcopy(model)
        obj = _objective(mine)
        results[rank] = replay_descent(obj, obj.flat(), revised=shards[rank]["revised"], pool=shards[rank]["pool"],
                                       rank=rank, reduce=reduce_for(rank), **knobs)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (new0, info0), (new1, info1) = results
    assert torch.equal(new0, new1) and info0 == info1  # every rank the same bits and the same report
    expected = _reference(model, shards, passes=2, lr=0.02, ratio=1.0, batch_size=6, seed=3)
    torch.testing.assert_close(new0, expected, rtol=1e-7, atol=1e-8)  # fp64; a wrong batch or step is off by >1e-3


def test_the_module_updates_only_the_selected_parameters_and_lowers_the_revised_loss():
    model = _model(2)
    (x, a), (x_new, a_new) = _data(60, 5), _data(6, 6)
    changed = torch.arange(6)
    before = copy.deepcopy(model)
    unlearner = FeatureUnlearningModule(model, method="replay", l2=L2, params=["proj", "head"], passes=4, lr=0.01,
                                        replay_ratio=2.0, replay_batch_size=8)
    info = unlearner.unlearn(train=(x, a), changed=changed, revised=(x_new, a_new), processes=Processes())
    assert info["method"] == "replay" and info["revised_samples"] == 6 and info["replayed_per_pass"] == 12
    for (n, p), q in zip(model.named_parameters(), before.parameters()):
        assert (n in unlearner.names) != torch.equal(p, q), n  # the selected moved, the rest is bit-identical
    loss = lambda mod: float(attribute_bce(mod(x_new), a_new).mean().detach())  # noqa: E731
    assert loss(model) < loss(before)
    assert info["revised_loss_per_pass"][-1] < info["revised_loss_per_pass"][0]


@pytest.mark.parametrize("knob", [{"passes": 0}, {"passes": 1.5}, {"lr": 0.0}, {"lr": float("nan")},
                                  {"replay_ratio": -1.0}])
def test_bad_knobs_are_refused_naming_the_option(knob):
    with pytest.raises(ConfigError, match="--passes|--lr|--replay-ratio"):
        FeatureUnlearningModule(_model(), method="replay", **knob)
