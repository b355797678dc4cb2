"""One module per `xpnet` subcommand; each has run(args) returning the exit code."""
