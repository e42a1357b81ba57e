PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pytest workers; the suite is sized for 2 cores
JOBS ?= 2

.PHONY: demo test test-fast lint install clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build that lies on this workplace's disk: the hf extra's plain
# torch requirement would otherwise pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,hf,serve,eval,sweep,tpu,data]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check gptjax tests train.py sample.py

# The playground's browser test drives Debian's chromium through Selenium (docs/install.md):
# installed here when missing and we are root, else the test says how.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  echo "make: chromium not installed (apt-get install chromium chromium-driver, as root)"

# Everything: what CI runs (7.5 minutes on 2 cores once .venv exists; in a fresh clone 9.5, and 12
# where the tests' compile cache, the machine's ~/.cache/gptjax/jax-tests, is cold).
test: lint browser
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal tests

# Without the tests marked slow (subprocesses, training runs, benchmark scripts): under 2 minutes
# (2.5 with a cold compile cache), for the edit-and-check loop.
test-fast: lint browser
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal -m "not slow" tests

# Trains configs/default.yaml (about 4 minutes on 2 cores), samples 1,000 bytes (temperature,
# top-k and length from the run's sample section), says how much of it is stdlib vocabulary,
# and plots the run's curves.
demo: install
	$(BIN)/python train.py
	$(BIN)/python sample.py --checkpoint runs/default --prompt 'def ' --seed 0 > runs/default/sample.txt
	cat runs/default/sample.txt
	$(BIN)/python -m gptjax.bench.stdlib_words runs/default/sample.txt
	$(BIN)/python -m gptjax.plot runs/default --out runs/default/loss.png

clean:
	rm -rf $(VENV) runs
