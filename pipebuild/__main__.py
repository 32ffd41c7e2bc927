"""`python -m pipebuild`."""

from .fastmake import main

main()
