"""`python -m mpt_edge ...` (and `torchrun ... -m mpt_edge train ...`): the `mpt-edge` command line."""

from mpt_edge.cli import main

main()
