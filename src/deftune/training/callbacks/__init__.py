"""Features that act during training through the trainer's callback hooks: progressive unfreezing
(``stages``), gradient masks (``masks``) and dynamic-rank LoRA (``dynamic_rank``). Each module has a
``from_recipe(recipe, model)`` that returns its callback, or None when the recipe does not ask for it."""
