"""BN adaptation sees the dataset, not its last class: on a class-sorted folder the adapted
statistics match ``torch.optim.swa_utils.update_bn`` over the whole split, in either file order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import update_bn

from effbench.run import run_overrides
from effbench.techniques.precomputed.cache import FeatureCache
from effbench.techniques.precomputed.technique import build_backbone_as_run_does
from tests.conftest import FAST, compose_cfg

PER_CLASS = 150
BN = ["strategy=precomputed", "backbone=resnet18", "backbone.weights=null", "dataset=imagefolder",
      "dataset.image_size=32", "dataset.batch_size=8", "dataset.eval_batch_size=32",
      "hardware=cpu", "hardware.num_workers=0", "trainer.max_epochs=1",
      "tracking.energy=false", *FAST]


def _write(root: Path, dark: str, bright: str) -> Path:
    """Two classes of 16 px PNGs (150 each: enough batches to average BN's batch noise) in
    folders named ``dark`` and ``bright``: the file order lists
    the folders by name, so the names decide which class comes first."""
    for name, level in ((dark, 40), (bright, 200)):
        for i in range(PER_CLASS):
            rng = np.random.default_rng(1000 * level + i)
            pixels = np.clip(level + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def _adapted(tmp_path: Path, root: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    """The adapted BN buffers the run stored in its cache entry."""
    summary = run_overrides([*BN, f"dataset.root={root}", *extra], tmp_path / "run")
    assert summary["status"] == "completed", summary["error"]
    cache = summary["strategy"]["precomputed"]["cache"]
    return FeatureCache(Path(cache["dir"]).parent).load(cache["keys"]["bn"])["state"]


def _reference(root: Path) -> dict[str, torch.Tensor]:
    """``update_bn`` (cumulative average) of the same backbone over the whole training split."""
    from hydra.utils import instantiate

    cfg = compose_cfg([*BN, f"dataset.root={root}"])
    model = build_backbone_as_run_does(cfg)
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.configure(model.preprocessing)
    dm.setup()
    # Another shuffle than the run's (the DataLoader's own, seeded apart).
    loader = dm.loader("train", shuffle=False, sampler=torch.utils.data.RandomSampler(
        dm.datasets["train"], generator=torch.Generator().manual_seed(12345)))
    batches = [dm.normalize(x) for x, _ in loader]
    update_bn(batches, model)
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _errors(adapted: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest per-layer mean |Δμ| in units of the reference std, largest per-layer median
    |var / var_ref − 1|) over the BN layers."""
    mean_err, var_err = [], []
    for key in (k for k in ref if k.endswith("running_mean")):
        var_ref = ref[key.replace("mean", "var")]
        mean_err.append(float(((adapted[key] - ref[key]).abs() / var_ref.sqrt()).mean()))
        rel = adapted[key.replace("mean", "var")] / var_ref - 1
        var_err.append(float(rel.abs().median()))
    return max(mean_err), max(var_err)


def test_adaptation_on_class_sorted_data_matches_update_bn(tmp_path: Path) -> None:
    root = _write(tmp_path / "sorted", "a_dark", "b_bright")
    ref = _reference(root)
    # Measured: in file order (the bright class last) 0.56 std and 81 % (EMA), 0.30 std and
    # 82 % (cumulative: class-pure batches have one class's variance); shuffled 0.07 and 15 %
    # for both (what is left is BN's batch-to-batch noise, also between two update_bn orders).
    for momentum in ("0.1", "null"):
        adapted = _adapted(tmp_path / momentum, root,
                           [f"strategy.precomputed.bn_momentum={momentum}"])
        mean_err, var_err = _errors(adapted, ref)
        assert mean_err < 0.15 and var_err < 0.3, (momentum, mean_err, var_err)


def test_adaptation_does_not_depend_on_file_order(tmp_path: Path) -> None:
    dark_first = _write(tmp_path / "d1", "a_dark", "b_bright")
    bright_first = _write(tmp_path / "d2", "b_dark", "a_bright")  # same images, other order
    one, two = _adapted(tmp_path / "a", dark_first, []), _adapted(tmp_path / "b", bright_first, [])
    mean_err, var_err = _errors(one, {k: v for k, v in two.items() if "running" in k})
    # Measured: 3.1 std apart in file order (each ended as its last class), 0.08 shuffled.
    assert mean_err < 0.15 and var_err < 0.3, (mean_err, var_err)



def test_the_replayed_passes_are_real_passes_over_the_shuffled_order(tmp_path: Path) -> None:
    """The run replays its passes from one recorded forward pass; real passes over the same
    shuffled batches give the same statistics (so the replay replays the shuffled order)."""
    from hydra.utils import instantiate

    from effbench.techniques.precomputed import bn_adapt
    from effbench.techniques.precomputed.extract import train_batches

    root = _write(tmp_path / "sorted", "a_dark", "b_bright")
    adapted = _adapted(tmp_path / "run", root, [])
    cfg = compose_cfg([*BN, f"dataset.root={root}"])
    model = build_backbone_as_run_does(cfg)
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.configure(model.preprocessing)
    layers = bn_adapt.batchnorm_layers(model)
    model.eval()
    for m in layers:
        m.train()
    with torch.no_grad():
        result = bn_adapt._real_passes(model, layers, lambda: train_batches(
            dm, torch.device("cpu"), int(cfg.strategy.precomputed.bn_shuffle_seed)), 0.01, 10, 0.1)
    assert result.forward_passes == result.passes > 1
    real = model.state_dict()
    for key in (k for k in real if "running" in k):
        assert torch.allclose(adapted[key], real[key], rtol=1e-4, atol=1e-5), key
