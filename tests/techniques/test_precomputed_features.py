"""The building blocks of ``precomputed``: BN adaptation, ambiguity weights, cache, heads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from effbench.errors import EffbenchError
from effbench.model.saved import describe_head
from effbench.techniques.precomputed.ambiguity import ambiguity, ambiguity_weights
from effbench.techniques.precomputed.bn_adapt import adapt_batchnorm
from effbench.techniques.precomputed.cache import FeatureCache, digest
from effbench.techniques.precomputed.heads import HeadDropout, build_head


def _shifted_batches(mean: float = 2.0, std: float = 3.0, n: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [mean + std * torch.randn(16, 3, 4, 4, generator=gen) for _ in range(n)]


def test_bn_adaptation_moves_stats_to_the_new_domain_and_stops_by_threshold() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batches = _shifted_batches()
    result = adapt_batchnorm(model, lambda: batches, threshold=1e-4, max_passes=20, momentum=0.5)
    bn = model[0]
    # The stem's statistics now describe N(2, 3²) instead of the initial N(0, 1).
    assert bn.running_mean == pytest.approx(torch.full((3,), 2.0), abs=0.3)
    assert bn.running_var == pytest.approx(torch.full((3,), 9.0), abs=1.5)
    # The threshold rule: it stopped at the first pass whose change fell below the threshold.
    assert result.converged and 1 < result.passes < 20
    assert result.changes[-1] < 1e-4 <= min(result.changes[:-1])
    assert model.training and bn.momentum == 0.1  # mode and momentum restored


def test_bn_adaptation_stops_at_max_passes_when_threshold_is_never_met() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    result = adapt_batchnorm(model, lambda: _shifted_batches(), threshold=0.0, max_passes=3,
                             momentum=0.1)
    assert result.passes == 3 and not result.converged and len(result.changes) == 3


def test_cumulative_bn_adaptation_forgets_the_old_domain() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].running_mean.fill_(-5.0)  # "pretrained" statistics of another domain
    model[0].num_batches_tracked.fill_(1000)
    batches = _shifted_batches()
    result = adapt_batchnorm(model, lambda: batches, threshold=1e-3, max_passes=10, momentum=None)
    batch_means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert model[0].running_mean == pytest.approx(batch_means, abs=1e-5)
    # One pass is the exact average; a second over the same batches could not change it.
    assert result.passes == 1 and result.converged


@pytest.mark.parametrize("momentum", [0.1, 0.05])
def test_the_threshold_decides_the_number_of_passes(momentum: float) -> None:
    """With the default EMA statistics the rule means something: a looser threshold stops
    earlier, a tighter one runs more passes."""
    passes = []
    for threshold in (0.3, 0.01, 1e-4):
        model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        batches = _shifted_batches()
        passes.append(adapt_batchnorm(model, lambda b=batches: b, threshold=threshold,
                                      max_passes=50, momentum=momentum).passes)
    assert passes[0] < passes[1] < passes[2], passes


def test_bn_adaptation_skips_a_backbone_without_batchnorm() -> None:
    result = adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1)), lambda: _shifted_batches(),
                             threshold=0.01, max_passes=5)
    assert result.passes == 0 and "no BatchNorm" in result.skipped


def test_ambiguous_logits_get_higher_weights() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0],    # confident
                           [2.0, 1.0, 0.0],     # somewhat unsure
                           [5.0, 5.0, 0.0]])    # a tie between the top two
    w = ambiguity_weights(logits, "multiclass", alpha=2.0)
    assert w[0] < w[1] < w[2]
    assert w[0] == pytest.approx(1.0, abs=1e-3) and w[2] == pytest.approx(3.0)
    assert ambiguity_weights(logits, "multiclass", alpha=0.0) is None
    multilabel = torch.tensor([[8.0, -8.0], [1.0, -1.0], [0.0, 0.0]])
    a = ambiguity(multilabel, "multilabel")
    assert a[0] < a[1] < a[2] and a[2] == pytest.approx(1.0)


def test_weighted_loss_is_normalised_by_the_weights() -> None:
    from effbench.losses import CrossEntropy

    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0]])
    y = torch.tensor([1, 0])
    loss_fn = CrossEntropy()
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = ambiguity_weights(logits, "multiclass", alpha=1.0)
    assert loss_fn(logits, y, sample_weight=w) == pytest.approx(float((w * per).sum() / w.sum()))


def test_cache_detects_truncated_and_corrupt_files(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    payload = {"features": torch.randn(50, 8), "labels": torch.arange(50)}
    path = cache.store("k", payload)
    loaded = cache.load("k")
    assert torch.equal(loaded["features"], payload["features"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])            # truncated (a killed writer, a full disk)
    assert cache.load("k") is None
    cache.store("k", payload)
    torch.save({"payload": {**payload, "labels": torch.zeros(50)}, "digest": digest(payload)},
               path)                                     # content does not match its checksum
    assert cache.load("k") is None
    assert not list(cache.dir.glob("*.tmp"))             # atomic writes leave no temp files


def test_heads() -> None:
    mlp = build_head("mlp", 16, 3, hidden=8, dropout=0.5)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, HeadDropout, nn.Linear]
    assert mlp(torch.randn(4, 16)).shape == (4, 3)
    assert isinstance(build_head("linear", 16, 3), nn.Linear)
    with pytest.raises(EffbenchError, match="strategy.precomputed.head='deep'"):
        build_head("deep", 16, 3)
    with pytest.raises(EffbenchError, match="strategy.precomputed.dropout=1.5"):
        build_head("mlp", 16, 3, dropout=1.5)


def test_head_dropout_is_inverted_dropout_fixed_by_the_seed() -> None:
    """The head's dropout (a uniform draw, faster than torch's CPU bernoulli) keeps each element
    with probability 1 − p, scales the kept by 1 / (1 − p), is the identity in evaluation, draws
    the same mask after the same seed, and is saved as the nn.Dropout it is in evaluation."""
    drop, x = HeadDropout(0.3), torch.ones(400, 512)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 204,800 draws: σ ≈ 0.001
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)
    assert torch.equal(drop.eval()(x), x)
    assert HeadDropout(0.0).train()(x) is x
    assert describe_head(build_head("mlp", 16, 3, hidden=8, dropout=0.3))["layers"][3] == \
        {"type": "Dropout", "args": {"p": 0.3}}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_replayed_passes_equal_real_passes(momentum: float | None) -> None:
    """One recorded forward pass replayed as BatchNorm's update gives the statistics, changes
    and counters of real passes (train-mode BN never feeds its running stats forward)."""
    from effbench.techniques.precomputed.bn_adapt import _real_passes, batchnorm_layers, bn_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    real = copy.deepcopy(model)
    batches = _shifted_batches()
    replayed = adapt_batchnorm(model, lambda: batches, threshold=1e-3, max_passes=20,
                               momentum=momentum)
    layers = batchnorm_layers(real)
    real.eval()
    for m in layers:
        m.train()
        m.momentum = momentum
        if momentum is None:
            m.num_batches_tracked.zero_()
    with torch.no_grad():
        reference = _real_passes(real, layers, lambda: batches, 1e-3, 20, momentum)
    assert replayed.forward_passes == 1 and reference.forward_passes == replayed.passes
    assert replayed.passes == reference.passes and replayed.changes == pytest.approx(
        reference.changes, rel=1e-4)
    for (k, a), b in zip(bn_state(model).items(), bn_state(real).values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k
