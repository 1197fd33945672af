"""The `dsvl2` command and its subcommands: thin layers over the library."""
