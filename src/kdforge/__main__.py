"""`python -m kdforge ...` (also what `torchrun -m kdforge train ...` runs)."""

from kdforge.cli import main

if __name__ == "__main__":
    main()
