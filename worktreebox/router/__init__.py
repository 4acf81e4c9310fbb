"""The host router: every box's services at `<service>.<box>.localhost:<router port>` through one
Caddy per home (README, "Reaching boxes from a laptop").

Derived, not stored: the routes are computed from the registry (routes.py) and pushed whole to
Caddy's admin API (caddy.py) whenever a box is made, claimed or removed, and by `gc`. The only
file is what the running Caddy is (router/state.json: its identity, port, and a digest of the
config it was given), so a `kill -9` of Caddy loses nothing: `needs_revive` notices it from
that file and a /proc read, and the next `sync` starts it again with every route. The router
starts with the first box that has a port and stops with the last one (`sync` decides both).
"""
