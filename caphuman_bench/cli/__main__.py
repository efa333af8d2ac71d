"""`python -m caphuman_bench.cli`: the same as the `caphuman-bench` script."""

from caphuman_bench.cli import main

main()
