"""`python -m testbed ...` == `testbed ...` (used to start nodes where no console script is on PATH)."""

from testbed.cli.main import main

main()
