"""`python -m bench.cli ...`: the `bench` command."""

from bench.cli import main

main()
