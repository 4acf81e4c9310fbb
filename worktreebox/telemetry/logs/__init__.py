"""Captured logs of a box: `record` (the format), `writer` (service output into records),
`reader` (filters, tail, follow) and `run` (a command run once with its output logged)."""
