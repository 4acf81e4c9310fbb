"""config.toml's schema (worktreebox/config/host.py) and the WTBOX_* variables that override it:
good values and what they become, bad ones and the exact sentence each gets. In process."""
from __future__ import annotations

import dataclasses

import pytest

from worktreebox import settings
from worktreebox.config import host as hostcfg
from worktreebox.config.load import load_host_config
from worktreebox.config.repo import LimitsConfig
from worktreebox.errors import ConfigError

DURATION = "a duration such as '30s', '10m' or '72h'"


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    for setting, _, _ in hostcfg.OVERRIDES:
        monkeypatch.delenv(setting.name, raising=False)


def load(tmp_path, text: str | bytes):
    path = tmp_path / "config.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_host_config(tmp_path)


@pytest.mark.parametrize(("text", "fields"), [
    ("", {}),
    (('[host]\nport_range = "21000-21999"\nmax_boxes = 10\nmax_active = 2\nmax_load = 3\nmounts = "checkout"\n'
      'layer_ttl = "2h"\nbackground_busy = false\nrouter = false\nrouter_port = 8800\nrouter_listen = "::"'),
     {"port_range": (21000, 21999), "max_boxes": 10, "max_active": 2, "max_load": 3.0, "mounts": "checkout",
      "layer_ttl": 7200.0, "background_busy": False, "router": False, "router_port": 8800, "router_listen": "::"}),
    ('[box]\ncpu_weight = 50\nmemory_max = "2G"\npids_max = 500',
     {"box_limits": LimitsConfig(cpu_weight=50, memory_max=2 << 30, pids_max=500)}),
    (('[database]\nprovider = "external"\nurl = "postgresql://u:p@h:5432/db"\nimage = "postgres:16"\n'
      "fsync_off = false\nspares = 0"),
     {"database_provider": "external", "database_url": "postgresql://u:p@h:5432/db", "postgres_image": "postgres:16",
      "fsync_off": False, "database_spares": 0}),
    ('[database]\nurl = "postgres://u:secret@h/db"',  # a URL alone: the external server
     {"database_provider": "external", "database_url": "postgres://u:secret@h/db"}),
    ('[database]\nurl = "postgres://u:secret@h/db"\nprovider = "embedded"',
     {"database_provider": "embedded", "database_url": "postgres://u:secret@h/db"}),
    ('[observability]\nprovider = "docker"\nimage = "vm:1"',
     {"observability_provider": "docker", "victoriametrics_image": "vm:1"}),
    ('[host]\nmounts = "zfs"', {"mounts": "zfs"}),  # judged where it is used, naming where it came from
])
def test_good_values(tmp_path, text, fields):
    cfg = load(tmp_path, text)
    path = str(tmp_path / "config.toml")
    want = dataclasses.replace(hostcfg.HostConfig(source=path, mounts_where=f"{path}: [host] mounts"), **fields)
    assert cfg == want


HOST_KEYS = ("background_busy, layer_ttl, max_active, max_boxes, max_load, mounts, port_range, router, router_listen, "
             "router_port, sandbox, sandbox_spares")


@pytest.mark.parametrize(("text", "sentence"), [
    ('[hots]\nport_range = "20000-20099"', ("unknown section [hots]; known sections: box, database, host, "
                                            "observability.")),
    ("host = 5", "[host] must be a table, got 5."),
    ('[host]\nport_rang = "20000-20099"', f"[host] has an unknown key 'port_rang'; known keys: {HOST_KEYS}."),
    ("[host]\nport_range = 5", "[host] port_range: expected a range such as \"20000-29999\", got 5."),
    ('[host]\nport_range = "abc-def"', "[host] port_range: expected a range such as '20000-29999', got 'abc-def'."),
    ('[host]\nport_range = "30000-20000"', ("[host] port_range: the range '30000-20000' must lie between 1024 and "
                                            "65535, low to high.")),
    ("[host]\nmax_boxes = 0", "[host] max_boxes: expected a whole number from 1 to 10000, got 0."),
    ('[host]\nmax_boxes = "64"', "[host] max_boxes: expected a whole number, got '64'."),
    ("[host]\nmax_boxes = true", "[host] max_boxes: expected a whole number, got True."),
    ("[host]\nmax_active = 0", "[host] max_active: expected a whole number of boxes above 0, got 0."),
    ("[host]\nmax_load = -1", "[host] max_load: expected a load average above 0, such as 4.0, got -1."),
    ("[host]\nmax_load = true", "[host] max_load: expected a load average above 0, such as 4.0, got True."),
    ("[host]\nmax_load = nan", "[host] max_load: expected a load average above 0, such as 4.0, got nan."),
    ("[host]\nmax_load = inf", "[host] max_load: expected a load average above 0, such as 4.0, got inf."),
    ("[host]\nmounts = 5", "[host] mounts: expected a mount provider name such as \"overlay\" or \"checkout\", got 5."),
    ('[host]\nlayer_ttl = "x"', f"[host] layer_ttl: expected {DURATION}, got 'x'."),
    ("[host]\nlayer_ttl = 0", f"[host] layer_ttl: expected {DURATION}, more than 0 and at most ten years, got 0."),
    ("[host]\nbackground_busy = 'maybe'", "[host] background_busy: expected true or false, got 'maybe'."),
    ('[box]\nttl = "1h"', "[box] has an unknown key 'ttl'; known keys: cpu_weight, disk_max, memory_max, pids_max."),
    ("[box]\ncpu_weight = 0", ("[box] cpu_weight: expected a whole number from 1 to 10000 (100 is every box's "
                               "share), got 0.")),
    ('database = "x"', "[database] must be a table, got 'x'."),
    ('[database]\nuser = "x"', ("[database] has an unknown key 'user'; known keys: fsync_off, image, provider, "
                                "spares, url.")),
    ('[database]\nprovider = "Embedded"', ("[database] provider: expected one of 'embedded', 'external', 'docker', "
                                           "got 'Embedded'.")),
    ("[database]\nurl = 5", "[database] url: expected a postgresql:// URL, got 5."),
    ('[database]\nurl = "mysql://root:hunter2@x/db"', ("[database] url: expected a postgresql://USER:PASSWORD@HOST:"
                                                       "PORT/DB URL, got a value that is not one.")),
    ('[database]\nimage = "a b"', "[database] image: expected an image name such as 'postgres:15', got 'a b'."),
    ("[database]\nimage = 5", "[database] image: expected an image name, got 5."),
    ('[database]\nfsync_off = "no"', "[database] fsync_off: expected true or false, got 'no'."),
    ("[database]\nspares = -1", "[database] spares: expected a whole number of spare databases, 0 or more, got -1."),
    ('[observability]\nprovider = "k8s"', "[observability] provider: expected one of 'native', 'docker', got 'k8s'."),
    ('[observability]\nretention = "1d"', ("[observability] has an unknown key 'retention'; known keys: image, "
                                           "provider.")),
    ('[database]\nprovider = "x"\n[host]\nmax_boxes = 0', ("[host] max_boxes: expected a whole number from 1 to "
                                                           "10000, got 0.")),  # tables in order
])
def test_bad_values_get_one_exact_sentence(tmp_path, text, sentence):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert str(e.value) == f"{tmp_path / 'config.toml'}: {sentence}"


def test_a_url_is_never_shown_back(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, '[database]\nurl = "postgresql://root:hunter2 x@h/db"')
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(("data", "start"), [
    (b"\xff\xfe\x00[host]", "cannot be read as UTF-8 TOML: 'utf-8' codec can't decode byte 0xff"),
    (b"[host\n", "is not valid TOML: Expected ']' at the end of a table declaration"),
])
def test_unreadable_files(tmp_path, data, start):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, data)
    assert str(e.value).startswith(f"{tmp_path / 'config.toml'} {start}")


# ---------------------------------------------------------------- WTBOX_* overrides

@pytest.mark.parametrize(("env", "fields"), [
    ({"WTBOX_MOUNTS": "overlay"}, {"mounts": "overlay", "mounts_where": "WTBOX_MOUNTS"}),
    ({"WTBOX_MOUNTS": "zfs"}, {"mounts": "zfs", "mounts_where": "WTBOX_MOUNTS"}),
    ({"WTBOX_LAYER_TTL": "3h"}, {"layer_ttl": 3 * 3600.0}),
    ({"WTBOX_LAYER_TTL": "0"}, {"layer_ttl": 0.0}),
    ({"WTBOX_PORT_RANGE": "22000-22099"}, {"port_range": (22000, 22099)}),
    ({"WTBOX_POSTGRES_URL": "postgresql://a:b@c/d"}, {"database_url": "postgresql://a:b@c/d",
                                                      "database_provider": "external"}),
    ({"WTBOX_POSTGRES_URL": "postgresql://a:b@c/d", "WTBOX_DATABASE_PROVIDER": "docker"},
     {"database_url": "postgresql://a:b@c/d", "database_provider": "docker"}),
    ({"WTBOX_DATABASE_PROVIDER": "docker"}, {"database_provider": "docker"}),
    ({"WTBOX_OBSERVABILITY_PROVIDER": "docker"}, {"observability_provider": "docker"}),
    ({"WTBOX_POSTGRES_IMAGE": "postgres:16"}, {"postgres_image": "postgres:16"}),
    ({"WTBOX_VICTORIAMETRICS_IMAGE": "vm:2"}, {"victoriametrics_image": "vm:2"}),
    ({"WTBOX_MOUNTS": "", "WTBOX_PORT_RANGE": ""}, {}),  # empty = unset
])
def test_overrides(tmp_path, monkeypatch, env, fields):
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    cfg = load(tmp_path, '[host]\nmounts = "checkout"\nlayer_ttl = "1h"\nport_range = "21000-21099"')
    path = str(tmp_path / "config.toml")
    base = {"mounts": "checkout", "mounts_where": f"{path}: [host] mounts", "layer_ttl": 3600.0,
            "port_range": (21000, 21099)}
    assert cfg == hostcfg.HostConfig(source=path, **{**base, **fields})


@pytest.mark.parametrize(("env", "sentence"), [
    ({"WTBOX_PORT_RANGE": "garbage"}, "WTBOX_PORT_RANGE: expected a range such as '20000-29999', got 'garbage'."),
    ({"WTBOX_PORT_RANGE": "30000-20000"}, ("WTBOX_PORT_RANGE: the range '30000-20000' must lie between 1024 and "
                                           "65535, low to high.")),
    ({"WTBOX_LAYER_TTL": "soon"}, f"WTBOX_LAYER_TTL: expected {DURATION}, got 'soon'."),
    ({"WTBOX_DATABASE_PROVIDER": "mysql"}, ("WTBOX_DATABASE_PROVIDER: expected embedded, external or docker, "
                                            "got 'mysql'.")),
    ({"WTBOX_OBSERVABILITY_PROVIDER": "k8s"}, "WTBOX_OBSERVABILITY_PROVIDER: expected native or docker, got 'k8s'."),
    ({"WTBOX_POSTGRES_URL": "not a url"}, ("WTBOX_POSTGRES_URL: expected a postgresql://USER:PASSWORD@HOST:PORT/DB "
                                           "URL, got a value that is not one.")),
    ({"WTBOX_POSTGRES_IMAGE": "a b"}, ("WTBOX_POSTGRES_IMAGE: expected an image name such as 'postgres:15', "
                                       "got 'a b'.")),
])
def test_bad_overrides_name_the_variable(tmp_path, monkeypatch, env, sentence):
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "")
    assert str(e.value) == sentence


def test_every_override_is_a_declared_setting_of_a_host_config_field():
    fields = {f.name for f in dataclasses.fields(hostcfg.HostConfig)}
    for setting, field, _ in hostcfg.OVERRIDES:
        assert setting in settings.SETTINGS and field in fields
