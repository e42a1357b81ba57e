"""Evaluation: perplexity and last-word accuracy (perplexity.py), batched log-likelihoods and
greedy continuations (scoring.py), the paper's K-shot tasks (tasks.py, fewshot.py), and the
lm-evaluation-harness model (lm_eval.py)."""
