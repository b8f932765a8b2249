"""Names of the validation metrics and which way is better (light: imported by the config schema)."""

METRIC_NAMES = ("exact_match", "token_f1", "bleu4", "rougeL")
HIGHER_IS_BETTER = {"eval_loss": False, "eval_ppl": False, "exact_match": True, "token_f1": True,
                    "bleu4": True, "rougeL": True}
