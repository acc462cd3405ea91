"""The ``surgeon`` command line: a typer app over the Python API, one module per command group."""
