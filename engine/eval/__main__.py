"""``python -m engine.eval mrr|linear|attentive|finetune|report|imagine ...``: the commands are in
``engine/cli.py`` (:func:`engine.cli.eval_main`). A package's ``__main__`` is a module nobody imports, so the
evaluation code runs once (a module's own ``__main__`` block importing the CLI would run it twice)."""
import sys

from engine.cli import eval_main

sys.exit(eval_main())
