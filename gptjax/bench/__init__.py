"""Benchmarks (not tests), apart from the code they measure, a file per subcommand:

    python -m gptjax.bench attention|train|torch|run|decode|serve|loglikelihood|data [options]

(attention.py, train.py, torch.py, run.py, decode.py, serve.py, loglikelihood.py, data.py; the
parser is cli.py). Each prints a small table and, with --json, one JSON object with its
provenance (provenance.py). Timings are medians over repeats after a warm-up (compile excluded
and reported separately); machines here are shared and noisy. Results are committed under
results/ at the repository root, and the docs' tables are made from them (report.py). The GPU
session's scripts (gpu.sh, gpu_profile.sh) and the demo's recorded run (record_run.py,
stdlib_words.py) live here too.
"""
