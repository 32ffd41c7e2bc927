"""`python -m pipebuild`."""

from .cli import main

main()
