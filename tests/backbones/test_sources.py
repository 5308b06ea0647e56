"""Generic sources: any torchvision classification model and any timm model by name.

For a handful of models of both libraries (chains of modules and models run through their own
forward): every parameter sits in exactly one stage, the backbone computes exactly the source
model's pre-logits features (the model's own state dict loads into it), the preprocessing comes
from the weights' metadata, and a frozen prefix of stages runs without autograd — so freezing works
on every model. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from effbench.backbones import build_backbone
from effbench.backbones.base import Backbone
from effbench.backbones.generic import DrivenBackbone
from effbench.errors import EffbenchError, root_cause

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"

# (source, name, classifier_layers, how it runs, feature_dim)
CASES = [
    ("torchvision", "resnet101", "keep", Backbone, 2048),
    ("torchvision", "vgg19", "drop", Backbone, 512),
    ("torchvision", "efficientnet_b3", "keep", Backbone, 1536),
    ("torchvision", "mobilenet_v3_large", "drop", Backbone, 960),
    ("torchvision", "regnet_x_400mf", "keep", Backbone, 400),        # generic chain
    ("torchvision", "shufflenet_v2_x0_5", "keep", Backbone, 1024),   # functional mean pooling
    ("torchvision", "squeezenet1_1", "keep", Backbone, 512),         # 1x1-conv classifier
    ("torchvision", "alexnet", "drop", Backbone, 256),               # functional flatten
    ("timm", "resnet18", "keep", Backbone, 512),
    ("timm", "efficientnet_b0", "keep", Backbone, 1280),
    ("timm", "convnext_atto", "keep", Backbone, 320),
    ("timm", "mobilenetv3_small_050", "keep", Backbone, 1024),       # pre-logits conv_head
    ("timm", "mobilenetv3_small_050", "drop", Backbone, 288),
    ("timm", "vit_tiny_patch16_224", "keep", DrivenBackbone, 192),   # class token, pos embed
]
IDS = [f"{s}-{n}-{c}" for s, n, c, *_ in CASES]
SIZE = {"vit_tiny_patch16_224": 224}


def _x(name: str, n: int = 2) -> torch.Tensor:
    size = SIZE.get(name, 64)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _reference(source: str, name: str) -> tuple[nn.Module, callable]:
    """The library's own model and a function giving its pre-logits features."""
    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model(name, pretrained=False).eval()
        return model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    model = torchvision.models.get_model(name, weights=None).eval()
    final = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    captured: list[torch.Tensor] = []
    final.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def features(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        model(x)
        return torch.flatten(captured[-1].mean((2, 3)) if captured[-1].ndim == 4
                             else captured[-1], 1)

    return model, features


@pytest.fixture(scope="module")
def built() -> dict:
    cache: dict = {}

    def get(source: str, name: str, layers: str) -> Backbone:
        key = (source, name, layers)
        if key not in cache:
            cache[key] = build_backbone(name, source=source, classifier_layers=layers,
                                        image_size=SIZE.get(name, 64))
        return cache[key]

    return get


@pytest.mark.parametrize(("source", "name", "layers", "kind", "dim"), CASES, ids=IDS)
def test_every_parameter_in_exactly_one_stage(source: str, name: str, layers: str, kind: type,
                                               dim: int, built) -> None:
    backbone = built(source, name, layers)
    assert type(backbone) is kind and backbone.source == source
    in_stages = [id(p) for stage in backbone.stages for p in stage.parameters()]
    assert len(in_stages) == len(set(in_stages)), "a parameter sits in two stages"
    assert set(in_stages) == {id(p) for p in backbone.parameters()}
    assert all(any(True for _ in s.parameters()) for s in backbone.stages), "an empty stage"
    assert len(backbone.stages) >= 3
    assert backbone.feature_dim == dim
    with torch.no_grad():
        assert backbone.eval()(_x(name)).shape == (2, dim)


@pytest.mark.parametrize(("source", "name", "layers", "kind", "dim"),
                         [c for c in CASES if c[2] == "keep"],
                         ids=[i for i, c in zip(IDS, CASES) if c[2] == "keep"])
def test_features_equal_the_source_models(source: str, name: str, layers: str, kind: type,
                                          dim: int, tmp_path: Path) -> None:
    """The library model's own state dict loads, and the backbone then computes its features."""
    reference, features = _reference(source, name)
    path = tmp_path / "model.pt"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(name, source=source, weights=str(path),
                              image_size=SIZE.get(name, 64)).eval()
    x = _x(name)
    with torch.no_grad():
        expected = features(x)
        assert torch.allclose(backbone(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("source", "name", "layers", "kind", "dim"), CASES, ids=IDS)
def test_frozen_prefix_runs_without_grad(source: str, name: str, layers: str, kind: type,
                                         dim: int, built) -> None:
    backbone = built(source, name, layers).eval()  # eval: BN stats stay put
    x = _x(name)
    with torch.no_grad():
        expected = backbone(x)
    k = len(backbone.stages) // 2
    for stage in backbone.stages[:k]:
        stage.requires_grad_(False)
    backbone.frozen_prefix = k
    try:
        for p in backbone.parameters():
            p.grad = None
        features = backbone(x)
        assert torch.allclose(features, expected, rtol=1e-4, atol=1e-5)
        assert features.requires_grad and torch.is_grad_enabled()
        features.sum().backward()
        assert all(p.grad is None for s in backbone.stages[:k] for p in s.parameters())
        trained = [p for s in backbone.stages[k:] for p in s.parameters()]
        assert sum(p.grad is not None for p in trained) >= 0.9 * len(trained)
        backbone.frozen_prefix = len(backbone.stages)  # all frozen: no graph at all
        assert not backbone(x).requires_grad
    finally:
        backbone.frozen_prefix = 0
        backbone.requires_grad_(True)


def test_driven_backbone_is_picklable_and_copyable(built) -> None:
    import copy
    import pickle

    backbone = built("timm", "vit_tiny_patch16_224", "keep").eval()
    x = _x("vit_tiny_patch16_224", 1)
    with torch.no_grad():
        expected = backbone(x)
        for clone in (copy.deepcopy(backbone), pickle.loads(pickle.dumps(backbone))):
            assert torch.allclose(clone(x), expected, atol=1e-6)
            clone.stages[0].root.pos_embed.data.zero_()  # a copy shares nothing with the original
            assert torch.allclose(backbone(x), expected, atol=1e-6)


def test_timm_preprocessing_from_pretrained_cfg(built) -> None:
    vit = built("timm", "vit_tiny_patch16_224", "keep").preprocessing.describe()
    assert vit["mean"] == [0.5, 0.5, 0.5] and vit["std"] == [0.5, 0.5, 0.5]
    assert vit["interpolation"] == "bicubic" and vit["source"].startswith("timm pretrained_cfg")
    pre = build_backbone("resnet18", source="timm").preprocessing  # native size, crop_pct 0.95
    assert (pre.crop_size, pre.resize_size) == (224, 235)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))


def test_tagged_timm_name() -> None:
    backbone = build_backbone("resnet18.a1_in1k", source="timm", image_size=32)
    assert "resnet18.a1_in1k" in backbone.preprocessing.source
    assert backbone.feature_dim == 512


def test_timm_pretrained_fetch_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    # every way timm's load_pretrained fetches weights (Hugging Face hub, URL, cached file)
    for fetch in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fetch, offline)
    with pytest.raises(EffbenchError, match="backbone.weights=null") as info:
        build_backbone("resnet18", source="timm", weights="imagenet")
    assert "timm" in str(info.value) and "network is unreachable" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(("source", "name", "expected"), [
    ("torchvision", "resnet43", "resnet34"),
    ("torchvision", "efficientnet_b9", "efficientnet_b"),
    ("timm", "convnext_atoo", "convnext_atto"),
])
def test_unknown_model_names_list_close_matches(source: str, name: str, expected: str) -> None:
    with pytest.raises(EffbenchError, match="closest: ") as info:
        build_backbone(name, source=source)
    message = str(info.value)
    assert expected in message and f"backbone.name={name}" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"name": None, "source": "timm"}, "backbone.name=<timm model>"),
    ({"name": "resnet18", "source": "keras"}, "backbone.source=keras"),
    ({"name": "resnet18", "source": "torchvision", "batch_norm": False},
     "backbone.batch_norm is not an option"),
    ({"name": "resnet18", "batch_norm": False}, "backbone.batch_norm is not an option"),
    ({"name": "resnet18", "classifier_layers": "some"}, "backbone.classifier_layers=some"),
    ({"name": "resnet18", "normalize": "maybe"}, "backbone.normalize=maybe"),
])
def test_bad_options_are_one_sentence(kwargs: dict, text: str) -> None:
    with pytest.raises(EffbenchError) as info:
        build_backbone(**kwargs)
    assert text in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_generic_yaml_instantiates(source: str) -> None:
    cfg = OmegaConf.load(CONF / f"{source}.yaml")
    cfg.name = "resnet18"
    backbone = instantiate(cfg, weights=None, image_size=32)
    assert backbone.source == source and backbone.feature_dim == 512
    with pytest.raises(Exception) as info:  # Hydra wraps it; run.py unwraps (errors.root_cause)
        instantiate(OmegaConf.load(CONF / f"{source}.yaml"), weights=None)
    cause = root_cause(info.value)
    assert isinstance(cause, EffbenchError)
    assert f"backbone={source} needs a model name" in str(cause)


@pytest.mark.parametrize(("source", "name", "size", "native"), [
    ("timm", "vit_tiny_patch16_224", 32, 224),        # a fixed-size ViT
    ("torchvision", "inception_v3", 32, 299),         # too small for Inception's stem
])
def test_model_that_cannot_run_at_the_image_size(source: str, name: str, size: int,
                                                 native: int) -> None:
    with pytest.raises(EffbenchError, match=f"dataset.image_size={native} or null") as info:
        build_backbone(name, source=source, image_size=size)
    assert f"dataset.image_size={size}" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_torchvision_model_with_its_own_forward_is_driven() -> None:
    """Pretrained GoogLeNet transforms its input inside forward (transform_input=True): not a
    chain of children, so the backbone runs the model's forward; features and freezing hold."""
    from effbench.backbones.torchvision_models import _generic, _without_aux, preprocessing_for

    kwargs = {"weights": None, "transform_input": True, "aux_logits": False, "init_weights": True}
    torch.manual_seed(0)
    backbone = _generic("googlenet", _without_aux(torchvision.models.googlenet(**kwargs)),
                        False, preprocessing_for("googlenet"))
    assert isinstance(backbone, DrivenBackbone) and len(backbone.stages) >= 3
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(**kwargs).eval()
    reference.fc = nn.Identity()
    x = _x("googlenet")
    backbone.eval()
    with torch.no_grad():
        assert torch.allclose(backbone(x), reference(x), atol=1e-5)
    backbone.stages[0].requires_grad_(False)
    backbone.frozen_prefix = 1
    backbone(x).sum().backward()
    assert all(p.grad is None for p in backbone.stages[0].parameters())
    assert all(p.grad is not None for p in backbone.stages[-1].parameters())
