"""The `wtbox` command line: the launcher, the CLI server and its protocol, the click commands."""
