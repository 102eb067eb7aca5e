"""Evaluation building blocks: metrics and gates (`metrics`), the model evaluator (`runner`).

What lives here knows nothing about plans or the lockfile: the evals provider calls
`evaluate` / `evaluate_endpoint`, then `check_gate` / `check_regression` on the numbers.
torch and transformers are imported only inside the functions of `runner` that load a model.
"""

from __future__ import annotations
