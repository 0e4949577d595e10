"""CLI sub-commands, one module each (see :data:`outlierlab.cli.COMMANDS`)."""
