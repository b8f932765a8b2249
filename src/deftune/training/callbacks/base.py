"""The trainer's callback interface and the public surface of the trainer that callbacks use.

A callback may call, on the trainer it is handed: ``log(record)`` (one metrics.jsonl line),
``say(text)`` (a console line that keeps the progress bar intact), ``micro_batch(i)`` (the i-th
micro-batch of the current epoch), ``rebuild_optimizer(...)`` (after changing which tensors train), and
read ``model``, ``device``, ``step`` and ``trainable`` (the :class:`~deftune.training.state.TrainableState`
every feature shares).
"""

from __future__ import annotations


class Callback:
    """Hooks for methods that act during training (dynamic rank, gradient masks, progressive unfreezing).

    Order within a step: forward/backward -> ``after_backward`` (gradients present, before clipping) ->
    clip, guard -> optimizer step -> ``after_optimizer_step`` -> logs -> ``on_step_end``. State returned by
    ``state_dict`` is checkpointed; ``load_state_dict`` runs on resume *before* the trainable tensors and
    optimizer are restored, so a callback can first give the model the shapes the checkpoint holds.
    """

    name = "callback"

    def on_train_start(self, trainer) -> None: ...

    def after_backward(self, trainer) -> None: ...

    def after_optimizer_step(self, trainer) -> None: ...

    def on_step_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, trainer) -> None: ...
