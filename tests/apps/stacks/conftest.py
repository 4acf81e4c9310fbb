# The stack apps are repos copied into boxes by tests/test_stacks.py; their tests run there, not here.
collect_ignore_glob = ["django/*", "express/*", "flask/*"]
