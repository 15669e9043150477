"""One module per CLI subcommand (see `neuroprune.cli`)."""
