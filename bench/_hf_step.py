"""Step time and peak memory of HF transformers + PEFT LoRA (optionally + Liger-Kernel, or QLoRA through
bitsandbytes) on a random-init model folder; the workload of ../shared/bench/anchor_lora.py.

    python bench/_hf_step.py --model-dir /tmp/m1b --shape llama-1b --bs 8 --seq 2048 [--liger | --bnb4]

SDPA attention, non-reentrant gradient checkpointing, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down,
the model's own loss (labels = input ids), fused AdamW, clip 1.0; 3 warm-up + N timed steps, median.
``--liger`` applies ``apply_liger_kernel_to_llama()`` (its defaults: RoPE, RMSNorm, SwiGLU, fused linear
cross-entropy) before loading. ``--bnb4`` loads the base weights as bitsandbytes NF4 (double quant, bf16
compute), the way Unsloth's ``load_in_4bit`` does, without upcasting the rest to fp32.
Prints one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import LORA_TARGETS, emit, labels_loss_step, runner_args, timed_steps  # noqa: E402


def main() -> None:
    ap = runner_args(__doc__)
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--bnb4", action="store_true")
    a = ap.parse_args()
    import torch

    impl = "hf+peft" + ("+liger" if a.liger else "") + (" qlora-bnb" if a.bnb4 else "")
    row = {"impl": impl, "shape": a.shape, "bs": a.bs, "seq": a.seq, "rank": a.rank, "device": a.device}
    on_cuda = a.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        emit({**row, "status": "error", "error": "no CUDA GPU visible"})
        return
    if a.liger:
        try:
            import liger_kernel
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as exc:
            emit({**row, "status": "not installed", "error": f"liger_kernel does not import: {exc}"})
            return
        apply_liger_kernel_to_llama()
        row["liger"] = getattr(liger_kernel, "__version__", "?")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.bfloat16 if on_cuda else torch.float32, attn_implementation="sdpa",
                  use_safetensors=True)
    if a.bnb4:
        try:
            import bitsandbytes
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            emit({**row, "status": "not installed", "error": f"bitsandbytes does not import: {exc}"})
            return
        row["bitsandbytes"] = bitsandbytes.__version__
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if on_cuda:
        kwargs["device_map"] = {"": 0}  # straight to the GPU (accelerate comes with peft)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kwargs)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if on_cuda else None)
    load_s = time.perf_counter() - t0
    timing = timed_steps(labels_loss_step(model, params, opt), model.config.vocab_size, a.bs, a.seq, a.device,
                         a.warmup, a.steps)
    row.update(timing, load_s=round(load_s, 1), trainable_m=round(sum(p.numel() for p in params) / 1e6, 2))
    if on_cuda:
        row.update(peak_gib=timing.get("peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 3)),
                   gpu=torch.cuda.get_device_name())
    emit(row)

if __name__ == "__main__":
    main()
