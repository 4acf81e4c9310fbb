"""A box's processes: the env they run with, one-off commands, the per-box supervisor and its client."""
