"""Shared helpers of the compare tests: run dirs with schema-valid summaries."""

from __future__ import annotations

from pathlib import Path

import jsonschema

from effbench.config import default_choice
from effbench.summary import SCHEMA, write_json_atomic

# The baseline a comparison picks by default: the config's own default strategy.
BASE = default_choice("strategy")
# Stand-ins for other strategies: compare reads any name alike, so the fake runs are named after
# what they are like, not after a technique.
CACHED = "cached"    # trains on cached features: far faster, few trainable parameters
PARTIAL = "partial"  # trains part of the model
SUBSET = "subset"    # trains on a changing subset (``subset/resampled`` in its curves)
SPARSE = "sparse"    # states a compressed size
INT8 = "int8"        # states an int8 size


def fake_run(root: Path, name: str, strategy: str, seed: int, acc: float, train: float,
             co2: float | None = None, params: int = 1000, size: int = 4000,
             overrides: tuple[str, ...] = (), status: str = "completed",
             task: str = "multiclass", curve: list[tuple[float, float, int]] | None = None,
             resampled_by: str = SUBSET) -> Path:
    """A run dir with a schema-valid summary.json (and optionally csv/metrics.csv rows of
    ``(train/acc, val/acc, <technique>/resampled)`` per epoch, under ``resampled_by``'s name)."""
    run_dir = root / name
    summary = {
        "schema_version": 1, "status": status,
        "error": None if status == "completed" else "RuntimeError: boom", "run_dir": str(run_dir),
        "choices": {"strategy": strategy, "backbone": "small_cnn", "dataset": "synthetic",
                    "hardware": "cpu", "seed": seed, "experiment": None},
        "overrides": [f"strategy={strategy}", f"seed={seed}", *overrides],
        "metrics": {"test/acc": acc, "test/auroc_macro": acc / 2} if status == "completed" else {},
        "per_class": {}, "best_val": {"val/acc": acc, "epoch": 1}, "epochs": 2,
        "time_s": {"setup": 1.0, "features": train / 2, "train": train / 2, "eval": 0.5,
                   "total": train + 1.5},
        "throughput_img_s": 100.0, "energy": {"kwh": None, "co2_kg": co2}, "peak_mem_mb": 10.0,
        "model": {"params_total": 5000, "params_trainable": params, "size_bytes": size},
        "data": {"task": task}, "hardware": {}, "strategy": {},
        "env": {"python": "3", "torch": "2", "torchvision": "0", "lightning": "2", "device": "cpu",
                "git_commit": None},
    }
    jsonschema.validate(summary, SCHEMA)
    write_json_atomic(run_dir / "summary.json", summary)
    if curve:
        (run_dir / "csv").mkdir()
        lines = [f"epoch,step,train/acc,val/acc,{resampled_by}/resampled"]
        for epoch, (tr, va, res) in enumerate(curve):  # Lightning writes train and val rows apart
            lines += [f"{epoch},{epoch},,{va},{res}", f"{epoch},{epoch},{tr},,"]
        (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir
