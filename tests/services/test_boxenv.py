"""Pure logic of the box process environment: what is another box's, what is the host's."""
from __future__ import annotations

from worktreebox.services.boxenv import without_box_vars


def test_another_boxs_ids_and_ports_are_dropped_but_host_settings_stay():
    parent = {"WTBOX_ID": "a-1234abcd", "WTBOX_PORT_WEB": "20001", "WTBOX_BOX_DIR": "/x",
              "WTBOX_PORT_RANGE": "30000-30999", "WTBOX_HOME": "/h", "PATH": "/bin"}
    assert without_box_vars(parent) == {"WTBOX_PORT_RANGE": "30000-30999", "WTBOX_HOME": "/h", "PATH": "/bin"}
