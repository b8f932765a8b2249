"""response_loss_sum: shifted cross-entropy over labelled tokens only, equal (value and gradients) to the
full-logits reference with ignore_index, and the positions it selects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from deftune.adapters.lora.model import attach_lora
from deftune.training.loss import IGNORE_INDEX, labelled_positions, response_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    attach_lora(model, "all-linear", "all", rank=4, alpha=8)
    return model.train()


def _labels():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6] = IGNORE_INDEX   # a packed row's second sample starts here
    labels[2, 1:] = IGNORE_INDEX  # only the first token labelled: nothing to predict in this row
    return ids, labels


def test_positions_pair_each_target_with_the_position_before_it():
    _, labels = _labels()
    target_at, hidden_at = labelled_positions(labels)
    T = labels.shape[1]
    want = [b * T + t for b in range(3) for t in range(1, T) if labels[b, t] != IGNORE_INDEX]
    assert target_at.tolist() == want
    assert (hidden_at == target_at - 1).all()
    assert not any(p % T == 0 for p in target_at.tolist())  # a row's first token is never a target


def test_loss_and_gradients_match_the_full_logits_reference():
    ids, labels = _labels()
    model = _model()
    loss, n = response_loss_sum(model, {"input_ids": ids, "labels": labels})
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    ref_model = _model()
    logits = ref_model(input_ids=ids).logits[:, :-1].float()
    ref = F.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 7 + 9 + 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6)


def test_a_batch_without_labelled_tokens_gives_zero_and_back_propagates():
    ids, labels = _labels()
    labels[:] = IGNORE_INDEX
    model = _model()
    loss, n = response_loss_sum(model, {"input_ids": ids, "labels": labels})
    assert n == 0 and float(loss) == 0.0
    loss.backward()  # no error; every gradient zero
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_positions_found_on_the_host_are_used_as_given():
    """train.loop.move finds the labelled positions on the CPU before the copy to the GPU; the loss takes
    them instead of asking the GPU (checked here with positions that keep only the first row's targets)."""
    from deftune.training.loop import move

    ids, labels = _labels()
    moved = move({"input_ids": ids, "labels": labels}, torch.device("meta"))
    target_at, hidden_at = moved["label_positions"]
    assert target_at.device.type == "meta" and target_at.shape == (16,) and hidden_at.shape == (16,)
    assert "label_positions" not in move({"input_ids": ids, "labels": labels}, torch.device("cpu"))

    model = _model()
    full, n_full = response_loss_sum(model, {"input_ids": ids, "labels": labels})
    first_row = labels.clone()
    first_row[1:] = IGNORE_INDEX
    given = labelled_positions(first_row)
    loss, n = response_loss_sum(model, {"input_ids": ids, "labels": labels, "label_positions": given})
    ref, n_ref = response_loss_sum(model, {"input_ids": ids, "labels": first_row})
    assert n == n_ref == 7 < n_full
    torch.testing.assert_close(loss, ref)
