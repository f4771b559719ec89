"""`python -m benchmarks.ablation`: see benchmarks/ablation/__init__.py."""

import sys

from benchmarks.ablation.cli import main

sys.exit(main())
