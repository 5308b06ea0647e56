"""effbench-compare: real sweeps through the CLI, numbers checked against the summaries, plots,
baseline deltas in the studies' form, failures listed, clear errors, TensorBoard HParams."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hydra.utils import get_class
from PIL import Image

from effbench.compare import paired_comparison
from effbench.compare.cli import main
from effbench.compare.cli import run as compare_run
from effbench.compare.curves import config_curve
from effbench.compare.group import compare
from effbench.compare.load import load_runs, train_time
from effbench.compare.stats import VERDICTS
from tests.compare.conftest import BASE, CACHED, PARTIAL, fake_run
from tests.conftest import CONF, FAST, assert_predictions, run_cli
from tests.helpers.cli import run_compare

SWEEP = ["dataset=synthetic", "dataset.num_train=96", "dataset.num_val=32", "dataset.num_test=32",
         "dataset.batch_size=32", "trainer.max_epochs=1", "tracking.energy=false", *FAST]


def second_strategy() -> str | None:
    """A strategy besides the default that trains in the shared loop: of those, the one a stack
    places first (others land in parallel); None: sweep the lr instead."""
    found = []
    for path in sorted((CONF / "strategy").glob("*.yaml")):
        name = path.stem  # each option's keys live under its own name
        node = (yaml.safe_load(path.read_text()) or {}).get(name)
        if name != BASE and isinstance(node, dict) and "_target_" in node:
            technique = get_class(node["_target_"])
            if not technique.replaces_loop:
                found.append((technique.order, name))
    return min(found)[1] if found else None


def compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_compare(args, cwd, timeout=300)


def sweep_dir(cwd: Path) -> Path:
    (found,) = (cwd / "outputs" / "multirun").iterdir()
    return found


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 300
        low, high = img.convert("L").getextrema()
        assert high - low > 100, f"{path.name} is blank"


@pytest.mark.slow
def test_real_sweep_table_matches_summaries(tmp_path: Path) -> None:
    second = second_strategy()
    if second:
        axis, baseline, key = [f"strategy={BASE},{second}"], [], "strategy"
    else:
        axis, key = ["optim.optimizer.lr=1e-3,1e-2"], "optim.optimizer.lr"
        baseline = ["--baseline", "optim.optimizer.lr=1e-3"]
    proc = run_cli(["-m", *SWEEP, *axis, "seed=0,1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = sweep_dir(tmp_path)
    res = compare_cli([str(sweep), *baseline], cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    # Expected numbers straight from the summaries.
    rows = []
    for path in sweep.rglob("summary.json"):
        s = json.loads(path.read_text())
        assert s["status"] == "completed", s["error"]
        value = s["choices"]["strategy"] if second else str(float(s["strategy"]["lr"]))
        rows.append({"cfg": value, "acc": s["metrics"]["test/acc"],
                     "train": train_time(s["time_s"]), "params": s["model"]["params_trainable"],
                     "size": s["model"]["size_bytes"]})
    exp = pd.DataFrame(rows).groupby("cfg").agg(["mean", "std"])
    base_cfg, other_cfg = (BASE, second) if second else ("0.001", "0.01")

    table = pd.read_csv(sweep / "compare" / "compare.csv", dtype={key: str}).set_index(key)
    assert list(table["n"]) == [2, 2]
    for cfg in (base_cfg, other_cfg):
        assert table.loc[cfg, "test/acc"] == pytest.approx(exp.loc[cfg, ("acc", "mean")])
        assert table.loc[cfg, "test/acc_std"] == pytest.approx(exp.loc[cfg, ("acc", "std")])
        assert table.loc[cfg, "train_s"] == pytest.approx(exp.loc[cfg, ("train", "mean")])
        assert table.loc[cfg, "train_s_std"] == pytest.approx(exp.loc[cfg, ("train", "std")])
        # The terminal table prints the same mean ± std.
        acc, sd = exp.loc[cfg, ("acc", "mean")], exp.loc[cfg, ("acc", "std")]
        assert f"{acc:.4f} ± {sd:.4f}" in res.stdout
    b, o = exp.loc[base_cfg], exp.loc[other_cfg]
    d = table.loc[other_cfg]
    assert d["d_metric_pp"] == pytest.approx((o[("acc", "mean")] - b[("acc", "mean")]) * 100)
    assert d["speedup"] == pytest.approx(b[("train", "mean")] / o[("train", "mean")])
    assert d["d_train_pct"] == pytest.approx((o[("train", "mean")] / b[("train", "mean")] - 1)
                                             * 100)
    assert d["d_params_pct"] == pytest.approx((o[("params", "mean")] / b[("params", "mean")] - 1)
                                              * 100)
    assert d["d_size_pct"] == pytest.approx((o[("size", "mean")] / b[("size", "mean")] - 1) * 100)
    assert bool(table.loc[base_cfg, "baseline"]) and not bool(d["baseline"])
    assert f"{d['d_metric_pp']:+.2f}".replace("-", "−") in res.stdout
    assert f"×{d['speedup']:.2f}" in res.stdout

    # Every run kept its predictions; the paired interval and verdict against the baseline (two
    # seeds a side: the two-level bootstrap) are in the CSV, the table and the technique's line.
    for path in sweep.rglob("summary.json"):
        assert_predictions(path.parent, json.loads(path.read_text()))
    for col in ("d_lo", "d_hi", "p_value", "verdict", "margin", "n_samples", "n_seeds"):
        assert col in table.columns, col
    assert d["d_lo"] <= d["d_metric_pp"] <= d["d_hi"] and d["verdict"] in VERDICTS
    assert (d["n_samples"], d["n_seeds"], d["margin"]) == (32, 2, 1.0)
    lo, hi = (f"{v:+.2f}".replace("-", "−") for v in (d["d_lo"], d["d_hi"]))
    assert f"[{lo}, {hi}]" in res.stdout and f"{d['verdict']} (p " in res.stdout
    assert f"… {d['verdict']} at 1 pp (bootstrap p = " in res.stdout

    out = sweep / "compare"
    md = (out / "compare.md").read_text()
    assert "baseline" in md and other_cfg in md and "| n" in md
    assert len(pd.read_csv(out / "runs.csv")) == 4
    pngs = ["metric_vs_time", "params_time_metric", "learning_curves", "train_val_gap",
            "pareto_time", "pareto_size"]
    if not second:
        pngs.append("metric_vs_optim.optimizer.lr")
    for name in pngs:
        assert_png(out / f"{name}.png")
    assert "co2.png skipped" in res.stdout  # energy off: said, not drawn empty
    assert "pareto_co2.png skipped" in res.stdout


@pytest.mark.slow
def test_failed_job_is_listed(tmp_path: Path) -> None:
    # A value only the job itself checks (Lightning's precisions): a bad value of the schema
    # would stop the whole sweep before it starts (preflight).
    proc = run_cli(["-m", *SWEEP, "trainer.precision=32-true,bogus", "seed=0"], cwd=tmp_path)
    # The sweep says that one job failed (exit 1); its summary.json is still there to compare.
    assert proc.returncode == 1 and "1 job(s) of the sweep" in proc.stderr, proc.stderr[-2000:]
    sweep = sweep_dir(tmp_path)
    res = compare_cli([str(sweep), "--out", str(tmp_path / "cmp")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1 runs" not in res.stdout and "2 runs (1 completed, 1 failed)" in res.stdout
    failed = res.stdout.split("failed runs:")[1]
    assert "precision=bogus" in failed and "trainer.precision='bogus'" in failed
    assert "0 (1 failed)" in res.stdout  # the configuration keeps its row
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Failed runs" in md and "trainer.precision='bogus'" in md
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert sorted(runs["status"]) == ["completed", "failed"]


# -- fast tests on summaries written in the real schema -------------------------------------------

@pytest.fixture
def study(tmp_path: Path) -> Path:
    """The default strategy vs a cheaper one on two lr values, two seeds each."""
    root = tmp_path / "sweep"
    for lr, ft_acc in (("1e-3", 0.90), ("0.01", 0.80)):
        for seed in (0, 1):
            fake_run(root, f"ft_{lr}_{seed}", BASE, seed, ft_acc + 0.02 * seed, 10.0,
                     co2=1e-3, params=1000, size=4000, overrides=(f"strategy.lr={lr}",),
                     curve=[(0.5, 0.6, 0), (0.9, 0.7, 0)])
            fake_run(root, f"pc_{lr}_{seed}", CACHED, seed, ft_acc + 0.01 + 0.04 * seed,
                     1.25, co2=2.5e-4, params=100, size=4000, overrides=(f"strategy.lr={lr}",),
                     curve=[(0.4, 0.5, 0), (0.8, 0.4, 1), (0.9, 0.8, 0)])
    return root


def test_deltas_in_the_studies_form(study: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main([str(study), "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    text = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "compare.csv", dtype={"strategy.lr": str})
    assert set(table["strategy.lr"]) == {"0.001", "0.01"}  # 1e-3 and 0.001 are one value
    pc = table[table["strategy"] == CACHED].set_index("strategy.lr")
    # acc: ft 0.90/0.92 vs pc 0.91/0.95 → +2 pp, paired per-seed diffs 1 and 3 pp → std √2
    assert pc.loc["0.001", "d_metric_pp"] == pytest.approx(2.0)
    assert pc.loc["0.001", "d_metric_pp_std"] == pytest.approx(2 ** 0.5)
    assert pc["d_train_pct"].tolist() == pytest.approx([-87.5, -87.5])
    assert pc["speedup"].tolist() == pytest.approx([8.0, 8.0])
    assert pc["d_co2_pct"].tolist() == pytest.approx([-75.0, -75.0])
    assert pc["co2_factor"].tolist() == pytest.approx([4.0, 4.0])
    assert pc["d_params_pct"].tolist() == pytest.approx([-90.0, -90.0])
    assert pc["d_size_pct"].tolist() == pytest.approx([0.0, 0.0])
    assert "×8.00" in text and "−87.5 %" in text and "−75.0 %" in text and "+2.00 ± 1.41" in text
    assert (f"{CACHED} vs {BASE} (2 configurations): test/acc +2.00 pp (±0.00), "
            "training time −87.50 % (±0.00), speed-up ×8.00") in text
    for name in ("metric_vs_time", "params_time_metric", "co2", "learning_curves",
                 "train_val_gap", "metric_vs_strategy.lr"):
        assert_png(tmp_path / "out" / f"{name}.png")


def test_default_out_sort_and_by(study: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(study), "--by", "strategy", "--sort", "time", "--no-plots"])
    text = capsys.readouterr().out
    assert (study / "compare" / "compare.md").is_file()
    table = pd.read_csv(study / "compare" / "compare.csv")
    assert list(table["strategy"]) == [CACHED] * 2 + [BASE] * 2  # fastest first
    # The lr varies within each strategy: its values stay apart, only seeds are averaged.
    assert list(table["n"]) == [2, 2, 2, 2] and "strategy.lr" in table
    assert "grouped by strategy, strategy.lr" in text and "also grouped by strategy.lr" in text


def test_glob_paths_and_metric(study: Path, tmp_path: Path) -> None:
    runs = load_runs([str(study / "pc_*"), str(study / "ft_1e-3_0")])
    assert len(runs) == 5
    comp = compare(runs, metric="test/auroc_macro")
    assert comp.metric == "test/auroc_macro" and comp.keys == ["strategy", "strategy.lr"]


def test_multilabel_defaults_to_macro_auroc(tmp_path: Path) -> None:
    for seed in (0, 1):
        fake_run(tmp_path, f"r{seed}", BASE, seed, 0.5, 1.0, task="multilabel")
    assert compare(load_runs([str(tmp_path)])).metric == "test/auroc_macro"


def test_curves_best_so_far_gap_and_resampling(study: Path, tmp_path: Path) -> None:
    dirs = [str(study / "pc_1e-3_0"), str(study / "pc_1e-3_1")]
    plain = config_curve(dirs, "val/acc")
    assert plain.mean.tolist() == pytest.approx([0.5, 0.4, 0.8]) and plain.resampled == [1]
    best = config_curve(dirs, "val/acc", best_so_far=True)
    assert best.mean.tolist() == pytest.approx([0.5, 0.5, 0.8])  # elitism: never goes down
    gap = config_curve(dirs, ("train/acc", "val/acc"))
    assert gap.mean.tolist() == pytest.approx([-0.1, 0.4, 0.1])
    with pytest.raises(SystemExit):
        main([str(study), "--best-so-far", "--out", str(tmp_path / "o")])
    assert_png(tmp_path / "o" / "learning_curves.png")


def test_failed_runs_are_listed_not_dropped(study: Path, capsys: pytest.CaptureFixture) -> None:
    fake_run(study, "broken", BASE, 2, 0.0, 1.0, status="failed",
             overrides=("strategy.lr=1e-3",))
    with pytest.raises(SystemExit):
        main([str(study), "--no-plots"])
    text = capsys.readouterr().out
    assert "9 runs (8 completed, 1 failed)" in text
    assert "RuntimeError: boom" in text.split("failed runs:")[1]
    assert "2 (1 failed)" in text


@pytest.mark.parametrize("args, message", [
    (["--baseline", f"strategy={PARTIAL}"],
     f"--baseline strategy={PARTIAL} matches no completed run; strategy has "
     f"{', '.join(sorted((BASE, CACHED)))}."),
    (["--baseline", "optimizer=sgd"], "--baseline key optimizer is not a config key"),
    (["--baseline", "strategy"], "--baseline strategy is not KEY=VALUE"),
    (["--metric", "test/nope"], "metric test/nope is in no completed run; use --metric with one"),
    (["--by", "nope"], "--by nope is not a config key of these runs"),
    (["--sort", "nope"], "--sort nope is not a column of the table"),
    (["--margin", "lots"], "--margin lots is not a margin in percentage points"),
])
def test_bad_input_is_one_clear_sentence(study: Path, args: list[str], message: str,
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main([str(study), "--no-plots", *args])
    assert done.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("effbench-compare: error: ") and message in err
    assert err.count("\n") == 1


def test_no_summaries_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = compare_cli([str(tmp_path / "empty")], cwd=tmp_path)
    assert res.returncode != 0
    assert "no summary.json found under" in res.stderr and "Traceback" not in res.stderr
    res = compare_cli([str(tmp_path / "missing")], cwd=tmp_path)
    assert res.returncode != 0 and "does not exist" in res.stderr


def test_hparams_reach_tensorboard(tmp_path: Path) -> None:
    """TensorBoard's HParams tab gets each run's config and final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from tests.conftest import run_job

    summary = run_job(tmp_path, ["trainer.max_epochs=1", "optim.optimizer.lr=0.01"])
    assert summary["status"] == "completed", summary["error"]
    found = None
    for events in sorted((tmp_path / "run" / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            found = (acc, acc.PluginTagToContent("hparams"))
        except KeyError:  # the fit's and the test's own event files carry no HParams
            continue
    assert found, "no HParams plugin data in the run's TensorBoard events"
    acc, content = found
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["strategy"].string_value == BASE
    assert start["optim.optimizer.lr"].number_value == pytest.approx(0.01)
    assert start["seed"].number_value == 0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/test/acc", "final/train_s", "final/params_trainable"} <= tags
    (value,) = acc.Scalars("final/test/acc")
    assert value.value == pytest.approx(summary["metrics"]["test/acc"])


def test_all_failed_is_an_error_naming_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake_run(tmp_path, "a", BASE, 0, 0.0, 1.0, status="failed")
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path), "--no-plots"])
    assert done.value.code != 0
    assert "none of the 1 runs completed" in capsys.readouterr().err


# -- paired intervals on predictions written in the real format ---------------------------------

def with_predictions(run_dir: Path, correct: list[bool] | np.ndarray,
                     ids_sha: str = "same-test-set") -> Path:
    """``predictions.npz`` of a binary classifier that is right exactly where ``correct`` is."""
    correct = np.asarray(correct, dtype=bool)
    labels = np.arange(len(correct)) % 2
    predicted = np.where(correct, labels, 1 - labels)
    probs = np.where(np.eye(2, dtype=bool)[predicted], 0.9, 0.1).astype(np.float32)
    np.savez(run_dir / "predictions.npz", ids=np.arange(len(correct)).astype(str), labels=labels,
             probs=probs, class_names=np.array(["a", "b"]), task=np.array("multiclass"),
             test_ids_sha256=np.array(ids_sha))
    return run_dir


def test_interval_and_verdict_from_predictions(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.9
    cheap = base.copy()
    cheap[np.flatnonzero(base)[::10]] = False  # 10 % of the right answers lost
    root = tmp_path / "sweep"
    with_predictions(fake_run(root, "ft", BASE, 0, base.mean(), 10.0), base)
    with_predictions(fake_run(root, "fr", PARTIAL, 0, cheap.mean(), 2.0), cheap)
    assert compare_run([str(root), "--no-plots", "--margin", "2pp"]) == 0
    text = capsys.readouterr().out
    row = pd.read_csv(root / "compare" / "compare.csv").set_index("strategy").loc[PARTIAL]
    assert row["verdict"] == "inferior" and row["p_value"] < 0.01 and row["d_hi"] < -2
    assert row["margin"] == 2.0 and row["n_samples"] == 400 and row["n_seeds"] == 1
    assert f"{PARTIAL} vs {BASE} (1 configuration): test/acc −" in text
    assert "… inferior at 2 pp (McNemar exact p = " in text
    assert "400 test samples, 1 vs 1 seeds" in text

    result = paired_comparison(root / "fr", root / "ft", margin=2.0)  # the notebook API
    assert result.verdict == "inferior" and result.lo == pytest.approx(row["d_lo"])
    same = paired_comparison(root / "ft", root / "ft", margin=0.5)
    assert (same.delta, same.verdict) == (0.0, "non-inferior")


def test_runs_without_predictions_or_on_other_images_get_no_interval(
        study: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare_run([str(study), "--no-plots"]) == 0
    text = capsys.readouterr().out
    table = pd.read_csv(study / "compare" / "compare.csv")
    assert table["d_lo"].isna().all() and set(table["verdict"].dropna()) <= {""}
    assert "no interval:" in text and "has no predictions.npz" in text

    root = tmp_path / "other"
    with_predictions(fake_run(root, "ft", BASE, 0, 0.9, 10.0), [True] * 50)
    with_predictions(fake_run(root, "fr", PARTIAL, 0, 0.9, 2.0), [True] * 50, "another-split")
    assert compare_run([str(root), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert (f"{PARTIAL}: no interval: {PARTIAL} and {BASE} were not tested on the same images"
            in text)


def test_seeds_counted_honestly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """n counts distinct seeds: a re-run of seed 0 is a repeat; seeds whose predictions are
    identical are one model, and said so."""
    root = tmp_path / "sweep"
    right = [True] * 40 + [False] * 10
    for name, seed in (("ft0", 0), ("ft0_again", 0), ("ft1", 1)):
        with_predictions(fake_run(root, name, BASE, seed, 0.8, 10.0), right)
    for seed in (0, 1):
        with_predictions(fake_run(root, f"fr{seed}", PARTIAL, seed, 0.8, 2.0), right)
    assert compare_run([str(root), "--no-plots"]) == 0
    text = capsys.readouterr().out
    table = pd.read_csv(root / "compare" / "compare.csv").set_index("strategy")
    assert table.loc[BASE, "n"] == 2 and table.loc[BASE, "repeats"] == 1
    assert "2 (+1 repeat)" in text and "2 runs of seed 0 are repeats" in text
    assert f"{PARTIAL}: seeds 0, 1 gave identical predictions" in text
    assert table.loc[PARTIAL, "n_seeds"] == 1 and table.loc[PARTIAL, "n_seeds_baseline"] == 1


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    from effbench.compare.plots import pareto_front

    cost = np.array([1.0, 2.0, 3.0, 4.0, 2.5])
    acc = np.array([0.70, 0.80, 0.78, 0.90, 0.80])  # 3.0 and 2.5 are beaten by 2.0
    assert pareto_front(cost, acc).tolist() == [0, 1, 3]
    assert pareto_front(cost, -acc, higher_better=False).tolist() == [0, 1, 3]
