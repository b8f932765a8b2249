"""One module per job, each a fixed life cycle (set up -> run -> save -> clean up): ``sft`` (train a
recipe), ``inference`` (load a run, evaluate, generate, merge), ``experts_score`` (ESFT's expert scores).
``demo.yaml`` is the bundled default recipe."""
