"""``python -m surgeon`` runs the CLI."""

from surgeon.cli import main

main()
