"""`python -m gptjax.lm_eval`: lm-evaluation-harness with `--model gptjax` (gptjax/eval/lm_eval.py)."""

import sys

from gptjax.eval.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
