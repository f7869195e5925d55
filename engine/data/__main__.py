"""``python -m engine.data shard IMAGEFOLDER OUT``: the parser lives in engine/cli.py."""
import sys

from engine.cli import data_main

sys.exit(data_main())
