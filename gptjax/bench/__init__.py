"""Benchmarks (not tests): `python -m gptjax.bench {attention,train,torch,decode,data} [options]`.

Each prints a small table and, with --json, one JSON object. Timings are medians over repeats
after a warm-up (compile excluded and reported separately); machines here are shared and noisy.
Every benchmark of the project lives in this package, apart from the code it measures; the
command line is `gptjax.bench.cli.main`.
"""
