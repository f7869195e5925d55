"""``python -m engine.export RUN OUT [--part ...]``: the parser lives in engine/cli.py."""
import sys

from engine.cli import export_main

sys.exit(export_main())
