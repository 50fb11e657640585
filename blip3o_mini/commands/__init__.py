"""One module per `blip3o-mini` subcommand (see `blip3o_mini.cli`)."""
