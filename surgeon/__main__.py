"""``python -m surgeon`` runs the CLI."""

from surgeon.cli.app import main

main()
