"""What a box tells about itself: logs, metrics, traces, probes, usage, the page in a browser."""
