"""One module per subcommand; :mod:`diffgen.commands.common` holds what they share."""
