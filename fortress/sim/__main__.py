"""``python -m fortress.sim --port 9001 ...``: run the simulated replica (see ``fortress sim --help``)."""

from fortress.sim.command import main

main()
