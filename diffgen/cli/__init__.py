"""The command line: one module per command over the library; what they share is in :mod:`diffgen.cli.support`."""
