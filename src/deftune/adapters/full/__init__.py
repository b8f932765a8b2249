"""Method ``full``: ordinary fine-tuning of the chosen modules' weights (:mod:`.method`)."""
