"""Layer shapes in a saved model: a channel-pruned network's layers are smaller than its config
builds them, so the shapes travel with the weights and the rebuilt layers are resized to fit."""

from __future__ import annotations

import torch
from torch import nn

# -- a channel-pruned model saved and rebuilt ---------------------------------------------------
# The attributes that say how many channels/features a layer has (forward reads ``groups``; the
# others keep the layer's description true). Saved with the weights, set on the rebuilt layers.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features",
               "out_features", "num_channels")


def module_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module name: {attribute: value}}`` of every layer that has one of ``SHAPE_ATTRS``."""
    out = {}
    for name, module in model.named_modules():
        attrs = {a: int(getattr(module, a)) for a in SHAPE_ATTRS
                 if isinstance(getattr(module, a, None), int)}
        if attrs:
            out[name] = attrs
    return out


def resize_to(model: nn.Module, state: dict[str, torch.Tensor],
              shapes: dict[str, dict[str, int]]) -> None:
    """Gives the layers of ``model`` (as built from its config) the shapes of a channel-pruned
    ``state`` dict: every tensor whose shape differs is replaced by an empty one of the saved
    shape (parameter or buffer, as it was) and the layer's ``shapes`` attributes are set, so
    ``load_state_dict(state)`` then fits. What torch-pruning did during training, from the file."""
    own = model.state_dict()
    for key, saved in state.items():
        if key not in own or own[key].shape == saved.shape:
            continue
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        empty = torch.empty(saved.shape, dtype=own[key].dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
        else:
            module._buffers[leaf] = empty
    for name, attrs in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # load_state_dict names what does not fit
        for attr, value in attrs.items():
            if attr in SHAPE_ATTRS and hasattr(module, attr):
                setattr(module, attr, int(value))
