"""`python -m cogsurgeon.inspector` is the `cogsurgeon` command (the tests use it to run the CLI from a checkout)."""

from cogsurgeon.inspector.console import main

main()
