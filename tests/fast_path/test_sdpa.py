"""``model.sdpa_backend`` (:mod:`deftune.fast_path.sdpa`): the preferred attention kernel around every
attention forward, and the key's checks."""

from __future__ import annotations

import pytest
import torch
from fast_models import (  # noqa: F401 (reference_path_on_cpu: an autouse fixture)
    lora_model,
    make_batch,
    reference_path_on_cpu,
)

from deftune.config import recipe_from_dict
from deftune.errors import DeftuneError
from deftune.fast_path import sdpa
from deftune.fast_path.patch import apply_fast_path
from deftune.fast_path.sdpa import prefer_sdpa_backend

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fast", [False, True])
def test_sdpa_backend_is_entered_around_every_attention_forward(monkeypatch, fast):
    """The preferred kernel is first in torch's priority list while each attention forward runs (also its
    recompute); outputs are unchanged."""
    model = lora_model("llama").train()
    model.config._attn_implementation = "sdpa"
    if fast:
        apply_fast_path(model, log=lambda _: None)
    batch = make_batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], use_cache=False).logits
    entered = []
    real = sdpa.sdpa_kernel

    def recording(order, set_priority=False):
        entered.append((order[0], set_priority))
        return real(order, set_priority=set_priority)

    monkeypatch.setattr(sdpa, "sdpa_kernel", recording)
    assert sdpa.prefer_sdpa_backend(model, "math") == 2
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert entered == [(torch.nn.attention.SDPBackend.MATH, True)] * 2
    torch.testing.assert_close(after, before)


def test_sdpa_backend_is_checked():
    with pytest.raises(DeftuneError, match="model.sdpa_backend must be auto, cudnn"):
        recipe_from_dict({"model": {"sdpa_backend": "fa3"}})
    model = lora_model("llama")
    model.config._attn_implementation = "eager"
    with pytest.raises(DeftuneError, match="applies to model.attn_implementation=sdpa; this model runs 'eager'"):
        prefer_sdpa_backend(model, "cudnn")
