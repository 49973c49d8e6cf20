"""Command-line glue: each module adds ``add_arguments_<cmd>`` / ``run_<cmd>`` pairs for cli.py."""
