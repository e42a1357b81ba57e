"""GPT-2 weights and Hugging Face directories: the mapping (gpt2.py), run import/export (convert.py)."""
