"""`vargpt data shapes`: a recipe's shapes-world splits without its training (see `vargpt.shapes.splits`)."""

from __future__ import annotations

import argparse
import json

from ..shapes.dataset import DATA_SPLITS
from .options import add_quiet_argument

DEFAULT_RECIPE = "shapes-tiny"


def register_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` (with its `shapes` sub-command) to a `vargpt` sub-command parser."""
    p = subparsers.add_parser("data", help="write evaluation and training data without training")
    kinds = p.add_subparsers(dest="dataset", required=True)
    s = kinds.add_parser(
        "shapes",
        help="a recipe's shapes-world splits (the rows `vargpt train` writes to its data/ folder)",
        description=(
            "Write the shapes-world splits of a recipe's data step: the same rows, images and per-task files "
            "`vargpt train` writes into <run>/data, so `vargpt eval shapes --data DIR` works without training."
        ),
    )
    s.add_argument("--out", required=True, help="folder to write into (created if missing)")
    s.add_argument(
        "--splits",
        nargs="+",
        default=None,
        choices=DATA_SPLITS,
        metavar="SPLIT",
        help=f"which of {', '.join(DATA_SPLITS)} to write (default: all the recipe has; test-paraphrase only for "
        "recipes in the broad language; the recipe's train split takes a minute or two)",
    )
    s.add_argument("--recipe", default=DEFAULT_RECIPE, help="packaged recipe name or JSON file (default: %(default)s)")
    add_quiet_argument(s)
    s.set_defaults(func=run_data_shapes)


def run_data_shapes(args: argparse.Namespace) -> int:
    """Write the splits and print the rows per split and task as JSON."""
    from ..shapes.splits import write_recipe_splits
    from ..training.data_recipe import is_data_recipe
    from ..training.recipe import load_recipe

    if is_data_recipe(args.recipe):
        raise ValueError(f"{args.recipe} is a fine-tuning recipe on its own data: it has no shapes-world data step")
    spec = load_recipe(args.recipe)
    splits = None if args.splits is None else list(dict.fromkeys(args.splits))
    counts = write_recipe_splits(spec.data, spec.seed, args.out, splits, progress=not args.quiet)
    print(json.dumps({"recipe": spec.name, "seed": spec.seed, "out": str(args.out), "rows": counts}, indent=2))
    return 0
