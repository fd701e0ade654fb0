"""`python -m sinkscope.cli`: what `accelerate launch -m sinkscope.cli ...` runs."""

from . import main

main()
