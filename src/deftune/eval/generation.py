"""Batched generation for scoring and for `deftune generate`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                   batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 0, streamer=None) -> list[str]:
    """Continue each prompt; return only the new text. Greedy unless ``do_sample``.

    Prompts are left-padded so every row's continuation starts at the same position.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    add_bos = bool(tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id])
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_bos).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                # Neutralise sampling defaults some checkpoints ship in generation_config.
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if streamer is not None:
                kwargs["streamer"] = streamer
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
