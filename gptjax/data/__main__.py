"""`python -m gptjax.data build --config C`: the token cache as a step of its own."""

import sys

from gptjax.data.build import main

sys.exit(main())
