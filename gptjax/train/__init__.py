"""Training: the loop (trainer.py), its state and pure step (state.py), the optimizer and batch
ramp (optim.py), the plan of memory and FLOPs (plan.py), and the run's one writer (progress.py)."""
