"""Gradient masks: only a chosen part of the trainable parameters may change.

Three masks compose (an element may change only if every active mask allows it):

- by name: ``mask.modules`` glob patterns on parameter names (``*.self_attn.*``);
- by layer: ``mask.layers`` (``top:N``, ``A-B``, a list);
- per element: the FISH mask (Sung et al. 2021), the top ``mask.fisher_keep`` fraction of elements by
  accumulated squared gradients (:mod:`deftune.training.fisher`).

The selection by name and layer is here; the training callback that applies all three is
:mod:`deftune.training.callbacks.masks`.
"""

from deftune.adapters.masks.select import allowed_by_name_and_layer, layer_index

__all__ = ["allowed_by_name_and_layer", "layer_index"]
