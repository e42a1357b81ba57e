"""Decoding: the model-agnostic loop over a logits function (loop.py), per-row token choice
(choose.py), and the GPT behind it — prefill, KV-cache steps, sliding, `generate` (generate.py)."""
