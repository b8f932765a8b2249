"""bench/train_e2e.py's "unsloth sft" row: Unsloth's documented training path on the same records.

    python bench/_unsloth_sft_row.py --model-dir /tmp/m1b --shape llama-1b --bs 8 --seq 2048 \\
        --data /tmp/records.jsonl --out-dir /tmp/sft [--load4bit]

FastLanguageModel.from_pretrained(max_seq_length, dtype bf16, load_in_4bit) -> get_peft_model(r=16,
lora_alpha=16, lora_dropout=0, the 7 linear targets, use_gradient_checkpointing="unsloth") -> TRL
SFTTrainer(SFTConfig(per_device_train_batch_size, gradient_accumulation_steps=1, max_steps, lr 2e-4,
bf16, adamw_torch_fused, max_grad_norm 1.0, logging_steps 1, packing False, max_length, report_to
none)) on ``<data>.text.jsonl`` (the text deftune trains on; TRL appends the EOS) loaded with
``datasets``. Everything else is Unsloth's and TRL's default (Unsloth picks padding-free or padded
batches itself). A callback records each step's synchronized begin and end times; timing as in
bench/train_e2e.py's ``step_timing``. Runs in its own process (importing unsloth patches transformers).
Prints one ``BENCH_JSON`` line; any failure is a row with status "error" and the message.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

for _k, _v in dict(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import LORA_TARGETS, emit, host_rss_gib, max_rss_gib, runner_args  # noqa: E402
from train_e2e import step_timing  # noqa: E402


def sft_config(SFTConfig, seq: int, **kwargs):
    """SFTConfig across TRL versions: ``max_length`` (TRL >= 0.20) or else ``max_seq_length``.
    Returns (config, the length key used)."""
    errors = []
    for key in ("max_length", "max_seq_length"):
        try:
            return SFTConfig(**kwargs, **{key: seq}), key
        except TypeError as exc:
            errors.append(f"{key}: {exc}")
    raise TypeError("; ".join(errors))


def build_trainer(SFTTrainer, model, tok, dataset, config, callback):
    """SFTTrainer across versions: ``processing_class`` (TRL >= 0.12) or else ``tokenizer``."""
    try:
        return SFTTrainer(model=model, processing_class=tok, train_dataset=dataset, args=config,
                          callbacks=[callback])
    except TypeError as exc:
        if "processing_class" not in str(exc):
            raise
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=dataset, args=config, callbacks=[callback])


def run(a, row: dict) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {**row, "status": "skipped: no CUDA"}
    t_import = time.time()
    try:
        import unsloth
        from unsloth import FastLanguageModel
    except Exception as exc:  # no GPU or a broken install raises more than ImportError
        status = "not installed" if isinstance(exc, ModuleNotFoundError) else "error"
        return {**row, "status": status,
                "error": f"unsloth does not import: {type(exc).__name__}: {exc}"[:500]}
    import datasets
    import trl
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    row.update(unsloth=unsloth.__version__, trl=trl.__version__, datasets=datasets.__version__,
               import_s=round(time.time() - t_import, 1))

    class StepClock(TrainerCallback):
        """Synchronized wall time at the begin and end of every optimizer step."""

        def __init__(self):
            self.t0 = None
            self.begins, self.ends = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    t_load = time.time()
    model, tok = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=a.seq,
                                                   dtype=torch.bfloat16, load_in_4bit=a.load4bit)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=list(LORA_TARGETS),
                                             use_gradient_checkpointing="unsloth", random_state=3407,
                                             max_seq_length=a.seq)
    row["load_s"] = round(time.time() - t_load, 1)
    dataset = datasets.load_dataset("json", data_files=a.data + ".text.jsonl", split="train")
    config, length_key = sft_config(
        SFTConfig, a.seq, output_dir=a.out_dir, per_device_train_batch_size=a.bs,
        gradient_accumulation_steps=1, max_steps=a.warmup + a.steps, learning_rate=2e-4, bf16=True,
        optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=1, packing=False,
        dataset_text_field="text", report_to="none", save_strategy="no", seed=3407)
    row["sft_length_key"] = length_key
    clock = StepClock()
    trainer = build_trainer(SFTTrainer, model, tok, dataset, config, clock)
    row["padding_free"] = getattr(trainer.args, "padding_free", None)
    lengths = []
    try:
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    except Exception:  # noqa: BLE001 - a streamed or differently named dataset: reported as unknown
        pass
    if lengths:
        capped = [min(n, a.seq) for n in lengths]
        row.update(record_tokens_min=min(capped), record_tokens_max=max(capped))
    tokens_per_step = a.bs * (round(sum(capped) / len(capped)) if lengths else a.seq)
    # Peaks over the whole process, as the deftune rows read them (loading and quantizing included);
    # the loading part is kept beside them.
    row.update(load_peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               load_peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
    t_train = time.time()
    out = trainer.train()
    row["train_s"] = round(time.time() - t_train, 1)
    records = [{"step": k + 1, "tokens": tokens_per_step, "elapsed_s": end - clock.t0, "step_s": end - begin}
               for k, (begin, end) in enumerate(zip(clock.begins, clock.ends))]
    timing = step_timing(records, a.warmup)
    if timing["status"] == "ok" and timing["last_step"] != a.warmup + a.steps:
        timing["status"] = f"error: {timing['last_step']} steps timed of {a.warmup + a.steps}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row.update(timing, tokens_per_step_from="bs x mean tokenized record length (capped at seq)",
               loss_first_last=[losses[0], losses[-1]] if losses else None,
               trainer_train_runtime=getattr(out, "metrics", {}).get("train_runtime"),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
               gpu=torch.cuda.get_device_name())
    return row


def main() -> None:
    ap = runner_args(__doc__, device=False)
    ap.add_argument("--data", required=True, help="the records JSONL (its .text.jsonl sibling is read)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--load4bit", action="store_true")
    a = ap.parse_args()
    row = {"impl": "unsloth sft" + (" 4bit" if a.load4bit else ""), "shape": a.shape, "bs": a.bs,
           "seq": a.seq, "load_in_4bit": a.load4bit}
    try:
        row = run(a, row)
    except Exception as exc:  # noqa: BLE001 - the driver gets the message, not a crash
        oom = type(exc).__name__ == "OutOfMemoryError"
        row.update(status="oom" if oom else "error", error=f"{type(exc).__name__}: {exc}"[:800],
                   traceback=traceback.format_exc()[-2000:])
    row.update(host_rss_peak_gib=round(max_rss_gib(), 3), host_rss_gib=round(host_rss_gib(), 3))
    emit(row)


if __name__ == "__main__":
    main()
