"""Step time and peak memory of Unsloth LoRA / QLoRA on a random-init model folder; the workload and
settings of ../shared/bench/anchor_unsloth.py (use_gradient_checkpointing="unsloth", fused AdamW, clip 1.0).

    python bench/_unsloth_step.py --model-dir /tmp/m1b --shape llama-1b --bs 8 --seq 2048 [--load4bit]

Runs in its own process: importing unsloth patches transformers. Prints one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import os
import sys
import time

for _k, _v in dict(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import LORA_TARGETS, emit, labels_loss_step, runner_args, timed_steps  # noqa: E402


def main() -> None:
    ap = runner_args(__doc__, device=False)
    ap.add_argument("--load4bit", action="store_true")
    a = ap.parse_args()
    row = {"impl": "unsloth" + (" 4bit" if a.load4bit else ""), "shape": a.shape, "bs": a.bs, "seq": a.seq,
           "rank": a.rank, "load_in_4bit": a.load4bit}
    t_import = time.time()
    try:
        import unsloth
        from unsloth import FastLanguageModel
    except Exception as exc:  # no GPU or a broken install raises more than ImportError
        status = "not installed" if isinstance(exc, ModuleNotFoundError) else "error"
        emit({**row, "status": status, "error": f"unsloth does not import: {type(exc).__name__}: {exc}"[:500]})
        return
    import torch

    row.update(unsloth=unsloth.__version__, import_s=round(time.time() - t_import, 1))
    t_load = time.time()
    model, _tok = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=a.seq,
                                                    dtype=torch.bfloat16, load_in_4bit=a.load4bit)
    model = FastLanguageModel.get_peft_model(model, r=a.rank, lora_alpha=a.rank, lora_dropout=0, bias="none",
                                             target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0, max_seq_length=a.seq)
    FastLanguageModel.for_training(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    row["load_s"] = round(time.time() - t_load, 1)
    timing = timed_steps(labels_loss_step(model, params, opt), model.config.vocab_size, a.bs, a.seq, "cuda",
                         a.warmup, a.steps)
    emit({**row, **timing, "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
          "peak_gib": timing.get("peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 3)), "gpu": torch.cuda.get_device_name()})

if __name__ == "__main__":
    main()
