"""Every option of every config group composes, and what it names can be instantiated."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from effbench import schema
from effbench.errors import EffbenchError
from effbench.hardware import trainer_kwargs
from tests.conftest import CONF, compose_cfg

GROUPS = ["dataset", "backbone", "strategy", "optim", "hardware", "trainer", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
GPU_PRESETS = {"rtx4060", "t4", "gtx1070", "p100x4_ddp"}


def test_every_group_has_options() -> None:
    for group in ["dataset", "backbone", "strategy", "optim", "hardware", "trainer"]:
        assert any(g == group for g, _ in OPTIONS), group


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group: str, option: str, tmp_path) -> None:
    cfg = compose_cfg([f"{group}={option}", f"data_dir={tmp_path}"])
    assert cfg.hydra.runtime.choices[group] == option
    if group == "dataset":
        dm = instantiate(cfg.dataset, _convert_="all")
        assert dm.name == cfg.dataset.name
    elif group == "strategy":
        from effbench.stack import build_techniques

        [technique] = build_techniques(cfg.strategy)
        assert technique.name == option == list(cfg.strategy)[0]
    elif group == "optim":
        from effbench.recipe import Recipe

        assert Recipe.from_config(cfg.optim).lr > 0
    elif group == "backbone":
        # Building every architecture is covered by tests/backbones; here: the target resolves.
        from hydra.utils import get_method

        assert callable(get_method(cfg.backbone._target_))
    elif group == "hardware":
        _check_hardware(cfg, option)


def _check_hardware(cfg, option: str) -> None:
    needs_gpu = option in GPU_PRESETS
    if needs_gpu and torch.cuda.device_count() < int(cfg.hardware.devices):
        with pytest.raises(EffbenchError, match=f"hardware={option} needs"):
            trainer_kwargs(cfg.hardware, cfg.trainer)
        return
    kwargs = trainer_kwargs(cfg.hardware, cfg.trainer)
    assert kwargs["accelerator"] in ("cpu", "gpu")
    assert kwargs["precision"] in ("32-true", "16-mixed", "bf16-mixed")


def test_user_facing_keys_exist() -> None:
    cfg = compose_cfg()
    for key in ["dataset.root", "dataset.image_size", "dataset.batch_size", "backbone.weights",
                "trainer.max_epochs", "optim.optimizer.lr", "seed", "data_dir", "cache_dir"]:
        assert OmegaConf.select(cfg, key, default="__absent__") != "__absent__", key
    assert cfg.hydra.runtime.choices["dataset"] == "digits"
    assert cfg.hydra.runtime.choices["backbone"] == "small_cnn"
    assert cfg.hydra.runtime.choices["strategy"] == "finetune"
    assert cfg.hydra.runtime.choices["hardware"] == "auto"
    assert cfg.backbone.weights is None


def test_cache_dir_env_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EFFBENCH_CACHE_DIR", str(tmp_path / "c"))
    assert compose_cfg().cache_dir == str(tmp_path / "c")
    monkeypatch.delenv("EFFBENCH_CACHE_DIR")
    assert compose_cfg().cache_dir.endswith("effbench")


def test_hardware_presets_hold_only_differences() -> None:
    """Presets inherit from auto: each file is short and names what differs."""
    for path in (CONF / "hardware").glob("*.yaml"):
        if path.stem != "auto":
            assert "- auto" in path.read_text(), path.name


def test_trainer_overrides_hardware() -> None:
    cfg = compose_cfg(["hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp"])
    kwargs = trainer_kwargs(cfg.hardware, cfg.trainer)
    assert kwargs["devices"] == 2 and kwargs["strategy"] == "ddp"
    assert kwargs["accelerator"] == "cpu" and kwargs["precision"] == "32-true"


# -- the typed schema (effbench/schema.py) --------------------------------------------------------
NUMBERS = [f for f in schema.FIELDS if f.kind in ("int", "float")]


@pytest.mark.parametrize("field", NUMBERS, ids=[f.key for f in NUMBERS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "abc", True])
def test_schema_refuses_non_numbers(field: schema.Field, bad) -> None:
    """NaN and inf pass (or fail) every comparison, a bool is an int to Python: each is refused
    in one sentence that names the key and the value."""
    cfg = compose_cfg(["dataset=synthetic", "optim=sgd"])
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, field.key, bad, force_add=True)
    with pytest.raises(EffbenchError, match=f"invalid value {field.key}="):
        schema.check(cfg)


REQUIRED = [f.key for f in schema.FIELDS if f.required]


@pytest.mark.parametrize(("group", "option"), [o for o in OPTIONS if o[0] == "dataset"],
                         ids=[o for g, o in OPTIONS if g == "dataset"])
def test_required_keys_exist_in_every_option_and_the_defaults_pass(group: str,
                                                                   option: str) -> None:
    """A required key is in every option, so its absence means the user deleted it."""
    cfg = compose_cfg([f"{group}={option}"])
    for key in REQUIRED:
        assert schema.select(cfg, key) is not schema.ABSENT, key
    schema.check(cfg)


def test_a_deleted_required_key_is_named() -> None:
    with pytest.raises(EffbenchError, match="optim.optimizer.lr is required but missing"):
        schema.check(compose_cfg(["~optim.optimizer.lr"]))
