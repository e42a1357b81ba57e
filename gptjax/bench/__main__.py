import sys

from gptjax.bench.cli import main

sys.exit(main())
