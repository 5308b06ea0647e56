"""Backbones: every conf/backbone/*.yaml builds offline, stages cover the parameters exactly once,
weights files load (both formats) or fail with one clear EffbenchError, frozen prefixes hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from effbench.backbones import BACKBONES, build_backbone
from effbench.backbones.base import Backbone
from effbench.backbones.torchvision_models import ARCHS, preprocessing_for
from effbench.errors import EffbenchError

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
GENERIC = ("timm", "torchvision")  # any model of that library by backbone.name (test_sources.py)
NAMES = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem not in GENERIC)
SIZE = 32  # every backbone here works at 32 px (all torchvision ones end in adaptive pooling)
SMALL = ("small_cnn", "cifar_cnn14")


@pytest.fixture(scope="module")
def built() -> Callable[[str], Backbone]:
    """Each yaml instantiated once (vgg16 / resnet50 / densenet121 are slow to build)."""
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cfg = OmegaConf.load(CONF / f"{name}.yaml")
            cache[name] = instantiate(cfg, weights=None, image_size=SIZE)
        return cache[name]

    return get


def _batch(size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_yamls_match_registry() -> None:
    assert set(NAMES) == set(BACKBONES)
    for name in [*NAMES, *GENERIC]:
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg._target_ == "effbench.backbones.build_backbone"
        assert cfg.name == (None if name in GENERIC else name)
        assert cfg.get("source") == (name if name in GENERIC else None)
        assert cfg.weights == (None if name in SMALL else "imagenet")
        # every backbone offers the same switches (so overrides need no "+")
        assert cfg.normalize is True
        assert dict(cfg.head) == {"type": "linear", "hidden": [], "dropout": 0.0,
                                  "activation": "relu"}
        if name not in SMALL:
            assert cfg.classifier_layers == "keep"
    assert OmegaConf.load(CONF / "cifar_cnn14.yaml").batch_norm is True


def test_study_backbones_have_named_configs() -> None:
    """The transfer-learning study's nine Keras backbones, as torchvision shortcuts."""
    study = {"resnet50", "resnet101", "resnet152", "vgg16", "vgg19", "efficientnet_b0",
             "efficientnet_b3", "mobilenet_v3_large", "mobilenet_v2"}
    assert study <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_features_and_head_shapes(name: str, built: Callable[[str], Backbone]) -> None:
    backbone = built(name).eval()
    assert isinstance(backbone, Backbone) and backbone.name == name
    assert backbone.weights is None
    with torch.no_grad():
        features = backbone(_batch())
        logits = nn.Linear(backbone.feature_dim, 5)(features)
    assert features.shape == (2, backbone.feature_dim)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_stages_hold_every_parameter_once(name: str, built: Callable[[str], Backbone]) -> None:
    backbone = built(name)
    in_stages = [id(p) for stage in backbone.stages for p in stage.parameters()]
    assert len(in_stages) == len(set(in_stages)), "a parameter sits in two stages"
    assert set(in_stages) == {id(p) for p in backbone.parameters()}
    assert len(backbone.stages) >= 3


def test_feature_dims_and_stage_counts(built: Callable[[str], Backbone]) -> None:
    expected = {
        "resnet18": (512, 5), "resnet50": (2048, 5), "resnet101": (2048, 5),
        "resnet152": (2048, 5), "densenet121": (1024, 5),
        "mobilenet_v2": (1280, 6), "mobilenet_v3_large": (1280, 6),
        "mobilenet_v3_small": (1024, 5), "efficientnet_b0": (1280, 6),
        "efficientnet_b3": (1536, 6), "vgg16": (4096, 5), "vgg19": (4096, 5),
        "small_cnn": (512, 3), "cifar_cnn14": (128, 4),
    }
    assert {n: (built(n).feature_dim, len(built(n).stages)) for n in NAMES} == expected


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_is_sane(name: str, built: Callable[[str], Backbone]) -> None:
    pre = built(name).preprocessing
    assert pre.crop_size == pre.resize_size == SIZE  # dataset.image_size wins
    assert len(pre.mean) == len(pre.std) == 3
    assert all(0 < m < 1 for m in pre.mean) and all(0 < s < 1 for s in pre.std)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_preprocessing_comes_from_torchvision(arch: str) -> None:
    pre = preprocessing_for(arch)
    native = {"efficientnet_b3": 300}.get(arch, 224)
    assert pre.crop_size == native and pre.resize_size >= pre.crop_size
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    assert pre.source.startswith("torchvision weights") and arch.split("_")[0] in pre.source.lower()
    assert pre.interpolation in ("bilinear", "bicubic")


def test_small_cnns_default_to_32px_half_normalisation() -> None:
    for name in SMALL:
        pre = build_backbone(name).preprocessing
        assert (pre.crop_size, pre.resize_size, pre.mean, pre.std) == (32, 32, (0.5,) * 3,
                                                                        (0.5,) * 3)


def test_small_cnn_parameter_count(built: Callable[[str], Backbone]) -> None:
    model = nn.Sequential(built("small_cnn"), nn.Linear(512, 10))
    assert sum(p.numel() for p in model.parameters()) == 2_122_186


def test_cifar_cnn14_layout(built: Callable[[str], Backbone]) -> None:
    stages = built("cifar_cnn14").stages
    convs = [[m for m in stage.modules() if isinstance(m, nn.Conv2d)] for stage in stages]
    assert [len(c) for c in convs] == [3, 4, 4, 3]
    assert [c[0].out_channels for c in convs] == [32, 64, 128, 128]
    assert convs[2][0].stride == (2, 2)
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for cs in convs for c in cs)


def test_backbone_state_dict_round_trip(tmp_path: Path) -> None:
    source = build_backbone("resnet18")
    path = tmp_path / "resnet18_backbone.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path))
    assert loaded.weights == str(path)
    expected = source.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(("arch", "head"), [("resnet18", "fc"),
                                            ("mobilenet_v3_small", "classifier.3")])
def test_torchvision_state_dict_loads(arch: str, head: str, tmp_path: Path) -> None:
    reference = torchvision.models.get_model(arch, weights=None).eval()
    path = tmp_path / f"{arch}_torchvision.pt"
    torch.save(reference.state_dict(), path)
    loaded = build_backbone(arch, weights=str(path)).eval()
    x = _batch(64)
    with torch.no_grad():
        logits = reference.get_submodule(head)(loaded(x))
        assert torch.allclose(logits, reference(x), atol=1e-5)
    reference_params = {id(p) for p in reference.parameters()} - {
        id(p) for p in reference.get_submodule(head).parameters()}
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in reference.parameters() if id(p) in reference_params)


def test_foreign_weights_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "small_cnn.pt"
    torch.save(build_backbone("small_cnn").state_dict(), path)
    with pytest.raises(EffbenchError, match="state dict for resnet18") as info:
        build_backbone("resnet18", weights=str(path))
    assert str(path) in str(info.value) and "stages.0.0.weight" in str(info.value)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = build_backbone("small_cnn").state_dict()
    state["stages.2.1.weight"] = torch.zeros(512, 10)
    path = tmp_path / "wrong_shape.pt"
    torch.save(state, path)
    with pytest.raises(EffbenchError, match="stages.2.1.weight") as info:
        build_backbone("small_cnn", weights=str(path))
    assert str(path) in str(info.value)


def test_missing_or_unreadable_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(EffbenchError, match="does not exist") as info:
        build_backbone("small_cnn", weights=str(missing))
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EffbenchError) as info:
        build_backbone("small_cnn", weights=str(garbage))
    assert str(garbage) in str(info.value)


def test_imagenet_fetch_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    # An empty cache and a failing download: nothing may reach the network.
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "urlopen", offline, raising=False)
    with pytest.raises(EffbenchError, match="backbone.weights=null") as info:
        build_backbone("resnet18", weights="imagenet")
    assert str(tmp_path) in str(info.value)


def test_small_cnns_have_no_imagenet_weights() -> None:
    with pytest.raises(EffbenchError, match="backbone.weights=null"):
        build_backbone("small_cnn", weights="imagenet")


def test_null_strings_mean_random_init() -> None:
    assert build_backbone("small_cnn", weights="null").weights is None


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(EffbenchError, match="resnet34") as info:
        build_backbone("resnet34")
    message = str(info.value)
    assert all(name in message for name in BACKBONES)
    assert "closest: resnet18" in message or "closest: resnet50" in message
    assert "backbone=torchvision backbone.name=resnet34" in message  # a torchvision model
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("name", "k"), [("resnet18", 2), ("small_cnn", 1),
                                         ("mobilenet_v3_small", 3)])
def test_frozen_prefix_runs_without_grad(name: str, k: int) -> None:
    backbone = build_backbone(name, image_size=SIZE).eval()  # eval: BN stats stay put
    x = _batch()
    expected = backbone(x)
    outputs: list[torch.Tensor] = []
    for stage in backbone.stages[k - 1:k + 1]:
        stage.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    backbone.frozen_prefix = k
    features = backbone(x)
    assert torch.allclose(features, expected, atol=1e-6)
    last_frozen, first_trained = outputs
    assert last_frozen.grad_fn is None and not last_frozen.requires_grad
    assert first_trained.grad_fn is not None
    features.sum().backward()
    assert all(p.grad is None for stage in backbone.stages[:k] for p in stage.parameters())
    assert all(p.grad is not None for stage in backbone.stages[k:] for p in stage.parameters())
