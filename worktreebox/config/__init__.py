"""What configures wtbox: wtbox.toml and the host's config.toml, WTBOX_* settings, templates."""
