"""`python -m vargpt.cli ...` (what `accelerate launch -m vargpt.cli` runs): the `vargpt` command."""

from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
