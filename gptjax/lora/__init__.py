"""LoRA: low-rank adapters trained over a frozen base (adapters.py), LoRA run directories that
refer to their base by path and checksum (runs.py), and `python -m gptjax.lora merge`."""
