"""`python -m node.cli`: the same as the `pacsnode` command."""

from node.cli import main

main()
