"""`python -m gptjax.lora merge RUN_DIR --out NEW_RUN_DIR`."""

import sys

from gptjax.lora.merge import main

sys.exit(main())
