"""Heads (``Backbone.build_head``), parameter counts against the studies, the recorded
normalisation (``Preprocessing.describe``) and the ``normalize`` switch, cifar_cnn14 without BN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from effbench.backbones import build_backbone
from effbench.backbones.base import Preprocessing
from effbench.backbones.counts import bn_moving_stats, keras_param_count, missing_conv_biases
from effbench.backbones.heads import HeadSpec, head_params
from effbench.errors import EffbenchError

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
KERAS_HEAD = {"type": "mlp", "hidden": [256]}  # GlobalAveragePooling + Dense(256) + Dense(10)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- heads -----------------------------------------------------------------------------------------
def test_default_head_is_todays_linear() -> None:
    backbone = build_backbone("small_cnn")
    head = backbone.build_head(10)
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (512, 10)
    assert set(head.state_dict()) == {"weight", "bias"}  # checkpoints keep their keys


def test_mlp_head_layout() -> None:
    backbone = build_backbone("small_cnn", head={"type": "mlp", "hidden": [256, 64],
                                                 "dropout": 0.2, "activation": "gelu"})
    head = backbone.build_head(3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert head(torch.randn(4, 512)).shape == (4, 3)
    assert _params(head) == head_params(512, 3, backbone.head_spec) == (
        512 * 256 + 256 + 256 * 64 + 64 + 64 * 3 + 3)


def test_linear_head_with_dropout() -> None:
    head = build_backbone("small_cnn", head={"type": "linear", "dropout": 0.5}).build_head(10)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear]


def test_head_from_the_yaml(tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF / "resnet50.yaml")
    cfg.head.type, cfg.head.hidden = "mlp", [256]
    backbone = instantiate(cfg, weights=None, image_size=32)
    assert backbone.head_spec == HeadSpec("mlp", (256,), 0.0, "relu")
    assert backbone.describe()["head"] == {"type": "mlp", "hidden": [256], "dropout": 0.0,
                                           "activation": "relu"}


@pytest.mark.parametrize(("head", "text"), [
    ({"type": "conv"}, "backbone.head.type=conv"),
    ({"type": "mlp"}, "needs hidden layers"),
    ({"type": "mlp", "hidden": [0]}, "positive widths"),
    ({"type": "mlp", "hidden": ["wide"]}, "list of layer widths"),
    ({"dropout": 1.0}, "backbone.head.dropout=1.0"),
    ({"activation": "swish2"}, "backbone.head.activation=swish2"),
    ({"widths": [3]}, "backbone.head.widths is not a head option"),
])
def test_bad_head_is_one_sentence(head: dict, text: str) -> None:
    with pytest.raises(EffbenchError) as info:
        build_backbone("small_cnn", head=head)
    assert text in str(info.value) and len(str(info.value).splitlines()) == 1


# -- parameter counts against the transfer-learning study (Keras) ---------------------------------
def test_resnet50_keras_style_count() -> None:
    """The study's ResNet50: Keras ResNet50(include_top=False) = 23,587,712 + GAP + Dense(256) +
    Dense(10) = 527,114 → 24,114,826. torchvision's ResNet50 without fc has 23,508,032 trainable
    parameters; Keras also counts BN moving mean/variance (53,120) and has a bias on every conv
    before a BN (26,560): 23,508,032 + 53,120 + 26,560 = 23,587,712, exactly."""
    backbone = build_backbone("resnet50", classifier_layers="drop", head=KERAS_HEAD)
    head = backbone.build_head(10)
    assert _params(head) == 527_114
    assert _params(backbone) == 23_508_032
    assert _params(backbone) + _params(head) == 24_035_146  # what effbench trains and reports
    assert bn_moving_stats(backbone) == 53_120 and missing_conv_biases(backbone) == 26_560
    assert keras_param_count(backbone, conv_bias=True) + _params(head) == 24_114_826


# torchvision backbone without top (classifier_layers=drop), Keras' count of the same backbone,
# and the study's table (Dense(256) + Dense(10) head; millions, one decimal).
STUDY = [
    # name, torch params, Keras no-top, ResNet conv biases?, study M
    ("resnet50", 23_508_032, 23_587_712, True, 24.1),
    ("resnet101", 42_500_160, 42_658_176, True, 43.2),
    ("resnet152", 58_143_808, 58_370_944, True, 58.9),
    ("vgg16", 14_714_688, 14_714_688, False, 14.8),
    ("vgg19", 20_024_384, 20_024_384, False, 20.2),
    ("efficientnet_b0", 4_007_548, 4_049_571 - 7, False, 4.4),   # Keras' Normalization layer: 7
    ("efficientnet_b3", 10_696_232, 10_783_535 - 7, False, 11.2),
    ("mobilenet_v3_large", 2_971_952, 2_996_352, False, 3.2),
    ("mobilenet_v2", 2_223_872, 2_257_984, False, 2.6),
]


@pytest.mark.parametrize(("name", "torch_params", "keras", "conv_bias", "study_m"), STUDY,
                         ids=[s[0] for s in STUDY])
def test_study_parameter_counts(name: str, torch_params: int, keras: int, conv_bias: bool,
                                study_m: float) -> None:
    backbone = build_backbone(name, classifier_layers="drop", head=KERAS_HEAD)
    head = backbone.build_head(10)
    assert _params(backbone) == torch_params
    assert keras_param_count(backbone, conv_bias=conv_bias) == keras
    assert round((keras + _params(head)) / 1e6, 1) == study_m


def test_mobilenet_v2_linear_probe_count() -> None:
    """The study's MobileNetV2 transfer model: 2,257,984 frozen (Keras) + 12,810 = 2,270,794."""
    backbone = build_backbone("mobilenet_v2")
    assert keras_param_count(backbone) + _params(backbone.build_head(10)) == 2_270_794


def test_classifier_layers_drop_on_vgg16() -> None:
    keep = build_backbone("vgg16")
    drop = build_backbone("vgg16", classifier_layers="drop")
    assert (keep.feature_dim, drop.feature_dim) == (4096, 512)
    assert _params(keep) == 134_260_544 and _params(drop) == 14_714_688
    with torch.no_grad():
        assert drop.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)


# -- cifar_cnn14 -----------------------------------------------------------------------------------
def test_cifar_cnn14_without_batch_norm_is_table_1() -> None:
    backbone = build_backbone("cifar_cnn14", batch_norm=False)
    assert _params(backbone) + _params(backbone.build_head(10)) == 1_109_322
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 14 and all(c.bias is not None for c in convs)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_cifar_cnn14_batch_norm_default_and_yaml() -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_backbone("cifar_cnn14").modules())
    cfg = OmegaConf.load(CONF / "cifar_cnn14.yaml")
    cfg.batch_norm = False
    backbone = instantiate(cfg, image_size=None)
    assert _params(backbone) + _params(backbone.build_head(10)) == 1_109_322
    with pytest.raises(EffbenchError, match="backbone.batch_norm=maybe"):
        build_backbone("cifar_cnn14", batch_norm="maybe")


# -- preprocessing record and the normalize switch -------------------------------------------------
def test_describe_torchvision_weights() -> None:
    d = build_backbone("resnet50").preprocessing.describe()
    assert d == {"normalize": True, "mean": pytest.approx([0.485, 0.456, 0.406]),
                 "std": pytest.approx([0.229, 0.224, 0.225]), "size": 224, "resize_size": 232,
                 "resize": "crop", "interpolation": "bilinear", "source": d["source"]}
    assert d["source"].startswith("torchvision weights ResNet50_Weights.")


def test_describe_small_cnn_and_size_override() -> None:
    pre = build_backbone("small_cnn", image_size=48).preprocessing
    assert pre.describe()["size"] == 48 and pre.describe()["mean"] == [0.5] * 3
    assert "[-1, 1]" in pre.describe()["source"]
    resized = Preprocessing(224, 256, source="x", interpolation="bicubic").with_size(32)
    assert (resized.crop_size, resized.resize_size, resized.source, resized.interpolation) == (
        32, 32, "x", "bicubic")


def test_normalize_false_feeds_plain_unit_range() -> None:
    backbone = build_backbone("efficientnet_b0", normalize=False, image_size=32)
    pre = backbone.preprocessing
    assert (pre.mean, pre.std) == ((0.0,) * 3, (1.0,) * 3)  # (x - 0) / 1: the [0, 1] input
    d = pre.describe()
    assert d["normalize"] is False and d["mean"] == [0.0] * 3 and d["std"] == [1.0] * 3
    assert d["expected_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre.with_size(64).normalize is False
    assert pre.as_dict()["mean"] == [0.0] * 3  # caches keyed on what the network sees
    yaml = OmegaConf.load(CONF / "efficientnet_b0.yaml")
    yaml.normalize = False
    assert instantiate(yaml, weights=None, image_size=32).preprocessing.normalize is False


def test_backbone_describe() -> None:
    d = build_backbone("resnet18", source="torchvision", classifier_layers="drop").describe()
    assert d["source"] == "torchvision" and d["classifier_layers"] == "drop"
    assert d["feature_dim"] == 512 and d["stages"] == 5 and d["weights"] is None
    assert d["preprocessing"]["normalize"] is True
