"""Synthetic data and tiny models: what the tests, the demo and the tiny sweep run on.

* ``tiny_models``: tiny random-weight models of each family's real transformers classes, built in-process.
* ``tiny_checkpoints``: the same saved as checkpoints (model, tokenizer, processor) and loaded
  through the real-checkpoint path.
* ``tiny_data``: tiny TSVs of the paper's ten datasets in VLMEvalKit's real formats.
* ``proxy_data``: the proxy benchmark's seeded scene suite; ``proxy_checkpoints/``: the tiny
  models trained on it (``scripts/train_proxy.py``).
"""
