"""twinseg core library: data, models, losses, Lightning methods, metrics, diagnostics.

`core` never imports ray; orchestration lives in `experiments/`.
"""
