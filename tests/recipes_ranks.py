"""One rank of ``test_recipe_smoke.py``'s launch: every recipe file run in turn, as ``__main__``, in one pair of
ranks (one launch instead of one per recipe: the imports, the rendezvous and the launcher start once).

    deepspeed --num_gpus 2 tests/recipes_ranks.py ROOT RECIPE[:ARG,ARG...] ...

runs ``recipes/RECIPE.py --smoke --out ROOT/RECIPE ARG...`` for each (its ``sys.exit`` caught), rank 0's
standard output of each in ROOT/RECIPE.stdout, and every recipe's exit code in ROOT/codes.json once all ran.
The process group stays up between recipes (engine.distributed keeps an initialised one)."""
import contextlib
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str, args: list, out_root: str) -> int:
    sys.argv = [f"recipes/{recipe}.py", "--smoke", "--out", os.path.join(out_root, recipe), *args]
    rank = int(os.environ.get("RANK", "0"))
    log = os.path.join(out_root, f"{recipe}.stdout" if rank == 0 else f"{recipe}.stdout.{rank}")
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        try:
            runpy.run_path(os.path.join(ROOT, "recipes", f"{recipe}.py"), run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    return 0


def main(out_root: str, specs: list) -> None:
    codes = {}
    for spec in specs:
        recipe, _, args = spec.partition(":")
        codes[recipe] = run(recipe, [a for a in args.split(",") if a], out_root)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out_root, "codes.json"), "w") as f:
            json.dump(codes, f)


if __name__ == "__main__":
    root, *recipes = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(root, recipes)
