"""`python -m gptjax.eval`: perplexity, bits per byte and last-word accuracy of a run."""

import sys

from gptjax.eval.perplexity import main

sys.exit(main())
