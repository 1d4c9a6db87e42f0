"""`python -m loraxs_cli ...` (also what `torchrun -m loraxs_cli` runs)."""

from .cli.app import main

if __name__ == "__main__":
    main()
