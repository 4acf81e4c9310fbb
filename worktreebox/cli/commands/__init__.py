"""CLI commands, one module per topic; loaded lazily by worktreebox.cli.main."""
