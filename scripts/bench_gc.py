"""gc time with 50 boxes registered when nothing needs removal (target ≤ 1 s)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORE_TOML = '[database]\nmode = "none"\n[observability]\nenabled = false\n'


def bench_gc(runs: int = 5, work: Path | None = None, boxes: int = 50) -> dict:
    work = Path(work or tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-gc-", dir=work))
    repo = tmp / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    (repo / "wtbox.toml").write_text(CORE_TOML)
    env = {**os.environ, "WTBOX_HOME": str(tmp / "home"), "WTBOX_NO_AUTO_GC": "1"}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from worktreebox.host import Host

    host = Host(tmp / "home")
    for i in range(boxes):
        host.new(f"gc-{i}", repo=repo)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "gc", "--json"], env=env,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
        assert '"actions": []' in proc.stdout, proc.stdout
    for b in host.list():
        host.rm(b, force=True)
    subprocess.run(["rm", "-rf", str(tmp)])
    times.sort()
    return {"boxes": boxes, "gc_p50_ms": round(times[len(times) // 2] * 1000, 1),
            "gc_max_ms": round(times[-1] * 1000, 1), "target_ms": 1000,
            "ok": times[len(times) // 2] <= 1.0}
