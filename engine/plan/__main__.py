"""``python -m engine.plan RECIPE --gpus N ...``: the command is :func:`engine.cli.plan_main`."""
import sys

from engine.cli import plan_main

sys.exit(plan_main())
