"""The per-box Vector config: rendered, parsed and checked structurally (Vector itself is not installable here)."""
from __future__ import annotations

import shutil
import time
import tomllib
from pathlib import Path

import pytest

from worktreebox.box import Box
from worktreebox.resources.metrics import render_vector_config

HAVE_VECTOR = shutil.which("vector") is not None


def _box(tmp_path: Path) -> Box:
    box_id = "vec-1a2b3c4d"
    return Box(id=box_id, task="vec", repo=str(tmp_path / "repo"), branch=f"wtbox/{box_id}",
               dir=tmp_path / "home" / "boxes" / box_id, ports={"web": 20000, "metrics": 20001})


def _graph(cfg: dict) -> tuple[dict, dict, dict]:
    return cfg.get("sources", {}), cfg.get("transforms", {}), cfg.get("sinks", {})


def _components(inputs: list[str]) -> set[str]:
    """Input names without a named output (`wtbox_otlp.traces` is an output of `wtbox_otlp`)."""
    return {i.split(".", 1)[0] for i in inputs}


def _reaches_sink(name: str, cfg: dict) -> bool:
    """Follow `inputs` edges downstream from a component until a sink is found."""
    _sources, transforms, sinks = _graph(cfg)
    frontier, seen = [name], set()
    while frontier:
        cur = frontier.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for sink in sinks.values():
            if cur in _components(sink["inputs"]):
                return True
        frontier += [t for t, spec in transforms.items() if cur in _components(spec["inputs"])]
    return False


@pytest.mark.parametrize("victorialogs_url", [None, "http://127.0.0.1:9428/"])
def test_every_source_feeds_a_sink_and_names_are_the_boxs(tmp_path, victorialogs_url):
    box = _box(tmp_path)
    metrics_url = f"http://127.0.0.1:{box.ports['metrics']}"
    cfg = tomllib.loads(render_vector_config(box, metrics_url, victorialogs_url))
    sources, transforms, sinks = _graph(cfg)
    assert sources and sinks

    # Every input names an existing component; every source and transform ends in a sink.
    components = set(sources) | set(transforms)
    for name, spec in {**transforms, **sinks}.items():
        assert spec["inputs"], name
        assert _components(spec["inputs"]) <= components, (name, spec["inputs"])
    for name in components:
        assert _reaches_sink(name, cfg), f"{name} feeds no sink"

    # Paths and ports are this box's, nothing else's.
    assert cfg["data_dir"] == str(box.run_dir / "vector")
    [logs] = [s for s in sources.values() if s["type"] == "file"]
    assert logs["include"] == [f"{box.logs_dir}/*.jsonl"]
    assert any(s["type"] == "host_metrics" for s in sources.values())
    [prw] = [s for s in sinks.values() if s["type"] == "prometheus_remote_write"]
    assert prw["endpoint"] == f"http://127.0.0.1:{box.ports['metrics']}/api/v1/write"
    assert all(box.id in t.get("source", box.id) for t in transforms.values() if t["type"] == "remap")

    # Log records are counted under the name metrics.toml defines, labelled box/service/level.
    from worktreebox.telemetry.exposition import metric_specs

    [counts] = [t for t in transforms.values() if t["type"] == "log_to_metric"]
    [m] = counts["metrics"]
    assert m["name"] in metric_specs() and m["type"] == metric_specs()[m["name"]]["type"]
    assert set(m["tags"]) == set(metric_specs()[m["name"]]["labels"]) and m["tags"]["box"] == box.id

    vl = [s for s in sinks.values() if s["type"] == "elasticsearch"]
    if victorialogs_url:
        [vl] = vl
        assert vl["endpoints"] == ["http://127.0.0.1:9428/insert/elasticsearch/"]
        assert vl["query"]["_stream_fields"] == "box,service" and vl["query"]["_msg_field"] == "msg"
    else:
        assert vl == []


def test_vector_collector_without_vector_falls_back_to_builtin(host, make_repo, monkeypatch):
    if HAVE_VECTOR:
        pytest.skip("vector is installed; the fallback cannot be observed")
    repo = make_repo(toml='[database]\nmode = "none"\n[observability]\ncollector = "vector"\n')
    notes: list[str] = []
    with host.new("vecfb", repo=repo, progress=notes.append) as box:
        assert box.data["metrics"]["collector"] == "builtin"
        assert any("`vector` is not on PATH" in n for n in notes)
        assert not (box.run_dir / "vector.pid").exists()


@pytest.mark.skipif(not HAVE_VECTOR, reason="vector is not installed")
def test_vector_runs_per_box_and_stops_with_it(host, make_repo):
    from worktreebox.providers.metrics import native as vm

    repo = make_repo(toml='[database]\nmode = "none"\n[observability]\ncollector = "vector"\n')
    box = host.new("vecrun", repo=repo)
    assert box.data["metrics"]["collector"] == "vector"
    deadline = time.monotonic() + 10
    while not vm.find_processes(box.id, names=("vector",)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm.find_processes(box.id, names=("vector",))
    host.rm(box.id, force=True)
    assert vm.find_processes(box.id, names=("vector",)) == []


def test_otlp_source_forwards_every_signal_to_the_boxs_receiver(tmp_path):
    box = _box(tmp_path)
    otlp = {"grpc_address": "127.0.0.1:20002", "http_address": "127.0.0.1:20003",
            "receiver_url": "http://127.0.0.1:20004"}
    cfg = tomllib.loads(render_vector_config(box, "http://127.0.0.1:20001", otlp=otlp))
    sources, _transforms, sinks = _graph(cfg)
    [(name, src)] = [(n, s) for n, s in sources.items() if s["type"] == "opentelemetry"]
    assert src["grpc"]["address"] == otlp["grpc_address"] and src["http"]["address"] == otlp["http_address"]
    assert src["use_otlp_decoding"] is True  # forwarded as OTLP, not converted into Vector events
    forwarded = {}
    for sink in sinks.values():
        for i in sink["inputs"]:
            if i.startswith(name + "."):
                assert sink["type"] == "opentelemetry" and sink["protocol"]["encoding"]["codec"] == "otlp"
                forwarded[i.split(".", 1)[1]] = sink["protocol"]["uri"]
    assert forwarded == {s: f"{otlp['receiver_url']}/v1/{s}" for s in ("logs", "metrics", "traces")}
    assert _reaches_sink(name, cfg)
    # Without a receiver (observability off) there is no OTLP source at all.
    plain = tomllib.loads(render_vector_config(box, "http://127.0.0.1:20001"))
    assert not any(s["type"] == "opentelemetry" for s in plain["sources"].values())
