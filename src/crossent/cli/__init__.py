"""The `crossent` command line: `score` (this package) and `demo` (crossent.cli.demo)."""
