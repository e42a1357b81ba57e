"""`python -m gptjax.hf import|export`."""

import sys

from gptjax.hf.convert import main

sys.exit(main())
