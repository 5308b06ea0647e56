"""progressive_resizing: training images grow from initial_scale × full size to full size over
the first 1 - finetune_fraction of the optimizer steps (sides rounded to size_increment);
validation and test at full size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effbench import pipeline
from effbench.errors import EffbenchError
from effbench.stack import check_compatible
from effbench.technique import technique_class
from effbench.techniques.progressive_resizing import (
    ProgressiveResizing,
    ResizeBatch,
    scaled_side,
    scheduled_scale,
)
from tests.conftest import run_cli
from tests.helpers.cli import one_error_line
from tests.helpers.runs import configured
from tests.helpers.tiny import tiny

# 64 training images in batches of 16, 2 epochs: 8 optimizer steps; 32 px images. cifar_cnn14
# ends in global pooling (small_cnn's dense layer is sized for 32 px).
RUN = [*tiny(epochs=2), "dataset.batch_size=16", "backbone=cifar_cnn14",
       "strategy=progressive_resizing"]
# Step s of 8 at scale 0.5 + 0.5·min(s/8 / 0.8, 1), each side rounded to a multiple of 4.
SIDES = [16, 20, 20, 24, 24, 28, 32, 32]


def test_the_scale_grows_linearly_then_holds_full_size() -> None:
    assert scheduled_scale(0.0, 0.5, 0.2) == 0.5
    assert scheduled_scale(0.4, 0.5, 0.2) == pytest.approx(0.75)
    assert scheduled_scale(0.8, 0.5, 0.2) == scheduled_scale(0.95, 0.5, 0.2) == 1.0
    # delay_fraction: the initial scale first, then the ramp to 1 - finetune_fraction.
    assert scheduled_scale(0.3, 0.5, 0.2, delay_fraction=0.4) == 0.5
    assert scheduled_scale(0.6, 0.5, 0.2, delay_fraction=0.4) == pytest.approx(0.75)
    assert [scaled_side(32, scheduled_scale(s / 8, 0.5, 0.2), 4) for s in range(8)] == SIDES


def test_sides_are_multiples_of_the_increment_never_above_full_size() -> None:
    assert scaled_side(224, 0.45, 32) == 96   # 100.8 rounds to 3 × 32
    assert scaled_side(30, 0.99, 4) == 28      # 29.7 → 28, not 32 > 30
    assert scaled_side(30, 1.0, 4) == 30       # full size as it is
    assert scaled_side(10, 0.1, 4) == 4        # at least one increment


def test_training_sees_the_scheduled_sizes_and_evaluation_full_size(tmp_path: Path) -> None:
    ctx = configured(tmp_path, RUN)
    seen: list[tuple[bool, tuple[int, ...]]] = []
    ctx.system.backbone.register_forward_pre_hook(
        lambda _m, args: seen.append((ctx.system.training, tuple(args[0].shape))))
    technique = ctx.techniques[0]
    pipeline.fit_and_test(ctx, ctx.recipe, technique.callbacks(ctx))
    facts, _ = pipeline.finalize(ctx, ctx.techniques)
    assert [shape for training, shape in seen if training] == [(16, 3, s, s) for s in SIDES]
    evaluated = {shape[1:] for training, shape in seen if not training}
    assert evaluated == {(3, 32, 32)} and len(seen) == 8 + 2 * 1 + 1  # 2 validations, 1 test
    s = facts["progressive_resizing"]
    assert s["epochs"] == [{"epoch": 1, "sizes": [16, 20, 24], "batches": 4},
                           {"epoch": 2, "sizes": [24, 28, 32], "batches": 4}]
    assert s["full_size"] == 32 and s["first_size"] == 16 and s["steps_planned"] == 8
    assert s["first_full_size_step"] == 7
    assert s["pixel_share"] == pytest.approx(sum(x * x for x in SIDES) / (8 * 32 * 32))
    line = technique.headline({"strategy": facts})
    assert "16→32 px" in line and "step 7 of 8" in line and "62%" in line


def test_a_backbone_sized_for_the_full_input_is_refused_in_one_line(tmp_path: Path) -> None:
    res = run_cli([*RUN, "backbone=small_cnn"], tmp_path)
    line = one_error_line(res)
    assert "starts training at 16×16 px, which backbone small_cnn (built for 32 px) cannot " \
           "take" in line and "backbone=cifar_cnn14" in line


def test_an_out_of_range_option_is_one_line_from_the_command(tmp_path: Path) -> None:
    res = run_cli([*RUN, "strategy.progressive_resizing.initial_scale=1.5"], tmp_path)
    line = one_error_line(res)
    assert "strategy.progressive_resizing.initial_scale=1.5 must be a fraction in (0, 1)" in line


@pytest.mark.parametrize(("options", "says"), [
    ({"initial_scale": 0}, "initial_scale=0 must be a fraction in (0, 1)"),
    ({"finetune_fraction": 1.0}, "finetune_fraction=1.0 must be a fraction of the training"),
    ({"delay_fraction": -0.1}, "delay_fraction=-0.1 must be a fraction of the training"),
    ({"delay_fraction": 0.5, "finetune_fraction": 0.5}, "leave no training for the sizes"),
    ({"size_increment": 0}, "size_increment=0 must be a whole number of pixels >= 1"),
    ({"mode": "lanczos"}, "mode='lanczos' must be one of bilinear, bicubic"),
])
def test_bad_options_are_refused_in_one_sentence(options: dict, says: str) -> None:
    with pytest.raises(EffbenchError) as err:
        ProgressiveResizing(**options)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_an_increment_that_resizes_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EffbenchError, match="size_increment=32 rounds the first size back to "
                                            "the full 32 px"):
        configured(tmp_path, [*RUN, "strategy.progressive_resizing.size_increment=32"])


def test_a_graph_exported_at_full_size_is_refused() -> None:
    qat = technique_class("qat")()
    with pytest.raises(EffbenchError) as err:
        check_compatible([qat, ProgressiveResizing()])
    assert "qat trains a graph exported at the full input size" in str(err.value)


def test_outside_the_fit_it_drives_the_transform_resizes_nothing() -> None:
    """A later training phase without its callback (none is handed to it) trains at full size."""
    r = ResizeBatch(0.5, 0.2, 0.0, 4, "bilinear")
    x = torch.randn(2, 3, 32, 32)
    assert r(x, torch.zeros(2))[0] is x
    r.scale = 0.5
    assert r(x, torch.zeros(2))[0].shape == (2, 3, 16, 16)
    assert r.epochs == [{"epoch": 1, "sizes": [16], "batches": 1}]
