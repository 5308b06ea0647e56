"""``dynamic``: the resampling rule on scripted accuracies, checkpoint/resume, and real runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from effbench.data.base import random_crop_pad
from effbench.errors import EffbenchError
from effbench.techniques.dynamic.sampling import (
    KEEP,
    TYPE_I,
    TYPE_II,
    SubsetSampler,
    SubsetSchedule,
    resolve_alpha,
)
from tests.conftest import TINY, load_summary, run_cli, run_job

N, ALPHA = 1000, 400


def as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def schedule(**kw) -> SubsetSchedule:
    args = dict(n_total=N, alpha=ALPHA, beta=0.3, delta=0.01, gamma=0.9, variant="base", seed=0)
    return SubsetSchedule(**{**args, **kw})


def check_partition(s: SubsetSchedule) -> None:
    a, b = s.subset, s.complement(s.subset)
    assert len(a) == s.alpha and len(as_set(a)) == s.alpha  # |A| = α, no duplicates
    assert not as_set(a) & as_set(b) and len(a) + len(b) == s.n_total  # A ∩ B = ∅, A ∪ B = all


# -- the rule on scripted accuracy sequences ---------------------------------------------------
def test_base_scheme_resamples_when_change_below_delta() -> None:
    s = schedule()
    accs = [0.50, 0.505, 0.60, 0.595, 0.70, 0.70]
    expected = [0, 1, 0, 1, 0, 1]  # |Δ| < δ in either direction, never at the first epoch
    k = round(ALPHA * 0.3)
    for acc, want in zip(accs, expected):
        before = s.subset.clone()
        rec = s.step(acc)
        check_partition(s)
        assert rec["resampled"] == want and rec["subset_size"] == ALPHA
        kept = as_set(s.subset) & as_set(before)
        if want:
            # Exactly αβ images came from B (outside the old A); the rest were kept from A.
            assert len(kept) == ALPHA - k and rec["replaced"] == k
            assert as_set(s.subset) - kept <= as_set(s.complement(before))
        else:
            assert torch.equal(s.subset, before) and rec["replaced"] == 0
    assert s.summary()["resamples"] == 3 and s.summary()["resamples_type2"] == 0


def test_adaptive_type_two_draws_from_best_set() -> None:
    s = schedule(variant="adaptive", beta=0.5, delta=0.05)
    a1 = s.subset.clone()
    assert s.step(0.50)["type"] == KEEP          # epoch 1: nothing to compare with; A* = A1
    assert s.step(0.40)["type"] == TYPE_I        # no gain: type I from the current A (= A1)
    a2 = s.subset.clone()
    assert len(as_set(a2) & as_set(a1)) == ALPHA - round(ALPHA * 0.5)  # type I uses β₀
    rec = s.step(0.42)                           # small gain: type II from A* = A1, not A2
    assert rec["type"] == TYPE_II
    k = round(ALPHA * 0.9 ** 3 * 0.5)
    assert rec["replaced"] == k and rec["beta"] == pytest.approx(0.9 ** 3 * 0.5)
    a3 = s.subset
    check_partition(s)
    assert len(as_set(a3) & as_set(a1)) == ALPHA - k  # kept images all come from A*
    assert len(as_set(a3) - as_set(a1)) == k          # the new ones from outside A*
    assert as_set(a3) != as_set(a2)
    assert s.step(0.90)["type"] == KEEP          # a big gain: keep A; A* becomes A3
    assert torch.equal(s.best_subset, a3) and s.best_acc == 0.90


def test_beta_follows_gamma_power_n() -> None:
    s = schedule(variant="adaptive", beta=0.7, gamma=0.97)
    for n in range(1, 13):
        rec = s.step(0.5 + 0.001 * n)            # always a small gain → type II from epoch 2 on
        assert rec["beta"] == pytest.approx(0.97 ** n * 0.7 if n > 1 else 0.0)
        assert rec["type"] == (TYPE_II if n > 1 else KEEP)
        assert rec["replaced"] == (round(ALPHA * 0.97 ** n * 0.7) if n > 1 else 0)
        check_partition(s)


@pytest.mark.parametrize(("decay_all", "want"), [(False, 0.7), (True, 0.97 ** 2 * 0.7)])
def test_type_one_logs_the_beta_it_used(decay_all: bool, want: float) -> None:
    # Epoch 2 drops: type I from the current A with β₀ (γ²β₀ = 0.659 only with decay_all).
    s = schedule(variant="adaptive", beta=0.7, gamma=0.97, decay_all=decay_all)
    s.step(0.50)
    rec = s.step(0.45)
    assert rec["type"] == TYPE_I
    assert rec["beta"] == pytest.approx(want) and rec["replaced"] == round(ALPHA * want)


# accuracy per epoch: a drop of 5 pp (more than δ = 1 pp), then a gain of 0.5 pp (less than δ)
DROP_THEN_SMALL_GAIN = [0.50, 0.45, 0.455]


@pytest.mark.parametrize(("variant", "trigger", "types"), [
    ("base", "abs", [KEEP, KEEP, TYPE_I]),              # Fig. 5: |Δ| < δ; a big drop is no stall
    ("base", "improvement", [KEEP, TYPE_I, TYPE_I]),    # the text: Δ < δ, every drop resamples
    ("base", None, [KEEP, KEEP, TYPE_I]),               # the base scheme's own reading: abs
    ("adaptive", "improvement", [KEEP, TYPE_I, TYPE_II]),
    ("adaptive", "abs", [KEEP, KEEP, TYPE_II]),
    ("adaptive", None, [KEEP, TYPE_I, TYPE_II]),        # the variant's own reading: improvement
])
def test_trigger_readings(variant: str, trigger: str | None, types: list[int]) -> None:
    s = schedule(variant=variant, delta=0.01, trigger=trigger)
    assert [s.step(acc)["type"] for acc in DROP_THEN_SMALL_GAIN] == types
    assert s.summary()["trigger"] == (trigger or {"base": "abs", "adaptive": "improvement"}[
        variant])
    assert [r["change"] for r in s.history][1:] == pytest.approx([-0.05, 0.005])


def test_n_is_the_epoch_even_when_validation_skips_epochs() -> None:
    s = schedule(variant="adaptive", beta=0.7, gamma=0.97)
    s.step(0.50, n=2)
    rec = s.step(0.501, n=4)
    assert rec["type"] == TYPE_II and rec["beta"] == pytest.approx(0.97 ** 4 * 0.7)


def test_controls_full_set_and_fixed_subset() -> None:
    full = schedule(alpha=resolve_alpha(1.0, N))
    fixed = schedule(resample=False)
    a0 = fixed.subset.clone()
    for acc in [0.5, 0.5, 0.5]:
        assert full.step(acc)["resampled"] == 0 and fixed.step(acc)["resampled"] == 0
    assert len(full.subset) == N and torch.equal(fixed.subset, a0)
    assert fixed.summary()["seen_images"] == ALPHA


def test_seen_counts_distinct_images() -> None:
    s = schedule(beta=0.5)
    union: set[int] = set()
    for acc in [0.5, 0.5, 0.5, 0.5]:
        union |= as_set(s.subset)
        assert s.step(acc)["seen"] == len(union)


# -- checkpoint / resume ------------------------------------------------------------------------
def test_state_dict_round_trip_continues_same_schedule() -> None:
    accs = [0.5, 0.505, 0.4, 0.41, 0.6, 0.601, 0.3, 0.305]
    ref = schedule(variant="adaptive")
    for acc in accs:
        ref.step(acc)
    first = schedule(variant="adaptive")
    for acc in accs[:3]:
        first.step(acc)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = schedule(variant="adaptive", seed=123)  # a different seed: the state must win
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for acc in accs[3:]:
        resumed.step(acc)
    assert resumed.history == ref.history
    assert torch.equal(resumed.subset, ref.subset)
    assert torch.equal(resumed.best_subset, ref.best_subset)


def test_state_from_another_setup_is_refused() -> None:
    with pytest.raises(EffbenchError, match="strategy.dynamic.alpha"):
        schedule(alpha=300).load_state_dict(schedule().state_dict())


# -- config errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "want"), [(0.5, 500), (1.0, N), (1, N), (250, 250)])
def test_alpha_fraction_or_count(alpha: float, want: int) -> None:
    assert resolve_alpha(alpha, N) == want


@pytest.mark.parametrize("alpha", [0, -3, 2.5, N + 1, True])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(EffbenchError, match="strategy.dynamic.alpha"):
        resolve_alpha(alpha, N)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"variant": "fancy"}, "strategy.dynamic.variant='fancy'"),
    ({"beta": 1.5}, "strategy.dynamic.beta=1.5"),
    ({"gamma": 0.0}, "strategy.dynamic.gamma=0.0"),
    ({"delta": -0.1}, "strategy.dynamic.delta=-0.1"),
    ({"trigger": "sideways"}, "strategy.dynamic.trigger='sideways'"),
    # 400 new images, only 200 outside A
    ({"alpha": 800, "beta": 0.5}, "lower strategy.dynamic.beta"),
])
def test_bad_schedule_values(kw: dict, needle: str) -> None:
    with pytest.raises(EffbenchError, match=needle.replace(".", r"\.")):
        schedule(**kw)


# -- the sampler --------------------------------------------------------------------------------
def test_sampler_iterates_only_a_and_shards_ranks() -> None:
    s = schedule(alpha=401)
    ranks = [SubsetSampler(s, seed=0) for _ in range(2)]
    for r, sampler in enumerate(ranks):
        sampler.shard(2, r)
        sampler.set_epoch(3)
    shards = [list(x) for x in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 201
    assert set(shards[0]) | set(shards[1]) == as_set(s.subset)  # every rank: the same A
    assert len(set(shards[0]) & set(shards[1])) <= 1            # one wrap-around pad at most
    single = SubsetSampler(s, seed=0)
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert sorted(first) == sorted(single) and first != list(single)  # reshuffled per epoch


def test_random_crop_pad_keeps_shape_and_takes_windows() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = random_crop_pad(x, 2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6])
                   for dy in range(5) for dx in range(5))


# -- through the pipeline -----------------------------------------------------------------------
DYN = ["strategy=dynamic", "strategy.dynamic.alpha=0.5", "backbone=small_cnn"]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_end_to_end_trains_only_on_a_and_logs_decisions(tmp_path: Path) -> None:
    # δ = 1 makes every epoch after the first resample, whatever the accuracy.
    summary = run_job(tmp_path, [*DYN, "trainer.max_epochs=3", "strategy.dynamic.delta=1.0"])
    assert summary["status"] == "completed", summary["error"]
    on_disk = load_summary(tmp_path / "run")
    st = on_disk["strategy"]["dynamic"]
    assert st["subset_size"] == 48 and st["train_size"] == 96
    assert st["images_trained"] == 3 * 48  # epoch time scales with |A|: no full-set passes
    assert [r["resampled"] for r in st["history"]] == [0, 1, 1]
    assert st["seen_images"] > 48
    rows = [r for r in csv_rows(tmp_path / "run") if r.get("dynamic/resampled")]
    assert [float(r["dynamic/resampled"]) for r in rows] == [0.0, 1.0, 1.0]
    assert {float(r["dynamic/subset_size"]) for r in rows} == {48.0}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (tmp_path / "run" / "tb").glob("events.out.tfevents.*"):  # fit + test files
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"dynamic/resampled", "dynamic/beta", "dynamic/seen", "dynamic/type"} <= set(tags)


def test_resume_through_lightning_continues_schedule(tmp_path: Path) -> None:
    common = [*DYN, "strategy.dynamic.variant=adaptive", "strategy.dynamic.delta=1.0"]
    whole = run_job(tmp_path / "whole", [*common, "trainer.max_epochs=4"])
    half = run_job(tmp_path / "half", [*common, "trainer.max_epochs=2"])
    ckpt = tmp_path / "half" / "run" / "checkpoints" / "last.ckpt"
    resumed = run_job(tmp_path / "resumed", [*common, "trainer.max_epochs=4", f"resume={ckpt}"])
    for s in (whole, half, resumed):
        assert s["status"] == "completed", s["error"]

    def schedule_of(s: dict) -> list[tuple]:
        return [(r["epoch"], r["checksum"], r["type"], r["replaced"])
                for r in s["strategy"]["dynamic"]["history"]]

    assert schedule_of(resumed) == schedule_of(whole)
    assert len(schedule_of(whole)) == 4 and any(r[2] for r in schedule_of(whole))
    # The whole run's records: both parts' images (2 epochs before the resume + 2 after).
    assert resumed["strategy"]["dynamic"]["images_trained"] == whole["strategy"]["dynamic"][
        "images_trained"] == 4 * 48


def test_trigger_option_is_honoured_or_refused_through_the_cli(tmp_path: Path) -> None:
    bad = run_cli([*TINY, *DYN, "strategy.dynamic.trigger=sideways"], cwd=tmp_path / "bad")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "strategy.dynamic.trigger='sideways'" in bad.stderr and "use abs" in bad.stderr
    # Watching val/loss, the changes are falls: improvement (Δ < δ) resamples after each one,
    # abs (|Δ| < δ) only after falls smaller than δ.
    res = run_cli([*TINY, *DYN, "trainer.max_epochs=4", "strategy.dynamic.metric=val/loss",
                   "strategy.dynamic.trigger=improvement"], cwd=tmp_path / "good")
    assert res.returncode == 0, res.stderr[-2000:]
    [path] = (tmp_path / "good" / "outputs").rglob("summary.json")
    facts = json.loads(path.read_text())["strategy"]["dynamic"]
    assert facts["trigger"] == "improvement"
    history = facts["history"][1:]
    assert any(r["change"] <= -0.01 for r in history)  # an epoch the two readings disagree on
    assert [r["resampled"] for r in history] == [int(r["change"] < 0.01) for r in history]


def test_bad_variant_fails_with_one_sentence(tmp_path: Path) -> None:
    summary = run_job(tmp_path, [*DYN, "strategy.dynamic.variant=fancy"])
    assert summary["status"] == "failed"
    assert "strategy.dynamic.variant='fancy'" in summary["error"]


@pytest.mark.slow
def test_ddp_two_ranks_share_a(tmp_path: Path) -> None:
    args = ["hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp", "dataset=synthetic",
            "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32",
            "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "tracking.energy=false",
            *DYN, "strategy.dynamic.delta=1.0"]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = (tmp_path / "outputs").rglob("summary.json")
    summary = json.loads(path.read_text())
    assert summary["status"] == "completed", summary["error"]
    assert summary["hardware"]["world_size"] == 2
    # The callback checks every epoch that both ranks hold the same A (else the run fails);
    # the two shards together cover A exactly once per epoch.
    assert summary["strategy"]["dynamic"]["images_trained"] == 2 * 32
    assert [r["resampled"] for r in summary["strategy"]["dynamic"]["history"]] == [0, 1]
