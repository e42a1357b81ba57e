"""`python -m gptjax.serve`."""

import sys

from gptjax.serve.app import main

sys.exit(main())
