"""Gradient masks: only a chosen part of the trainable parameters may change.

Three masks compose (an element may change only if every active mask allows it):

- by name: ``mask.modules`` glob patterns on parameter names (``*.self_attn.*``);
- by layer: ``mask.layers`` (``top:N``, ``A-B``, a list);
- per element: the FISH mask (Sung et al. 2021), the top ``mask.fisher_keep`` fraction of elements by
  accumulated squared gradients.

The name and layer masks freeze whole tensors (``requires_grad`` off, so no gradients and no optimizer
state); the FISH mask zeroes masked gradients and restores masked elements bitwise after every optimizer
step. ``from_recipe`` returns the training callback, or None when no mask is asked for.
"""

from deftune.adapters.masks.callback import MASK_FROZEN, GradientMaskCallback, from_recipe
from deftune.adapters.masks.fisher import fisher_scores, top_k_mask
from deftune.adapters.masks.select import allowed_by_name_and_layer, layer_index

__all__ = [
    "MASK_FROZEN", "GradientMaskCallback", "from_recipe", "fisher_scores", "top_k_mask",
    "allowed_by_name_and_layer", "layer_index",
]
