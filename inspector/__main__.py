"""`python -m inspector` is the `cogsurgeon` command (the tests use it to run the CLI from a checkout)."""

from inspector.cli import main

main()
