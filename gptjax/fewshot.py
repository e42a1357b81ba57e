"""`python -m gptjax.fewshot`: the paper's zero/one/few-shot table (gptjax/eval/fewshot.py)."""

import sys

from gptjax.eval.fewshot import main

if __name__ == "__main__":
    sys.exit(main())
