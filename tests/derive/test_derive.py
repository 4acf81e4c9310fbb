"""`wtbox init`: wtbox.toml derived from compose, GitHub Actions, GitLab CI, Procfile, package.json,
devcontainer and manage.py, with provenance; what it cannot map named, never dropped."""
from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from worktreebox.config.load import parse_repo_config
from worktreebox.derive import VENV_PATH as VENV
from worktreebox.derive import derive
from worktreebox.derive.interpolate import Interpolation
from worktreebox.derive.writer import render


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def loaded(plan):
    """The rendered wtbox.toml as the loader reads it, and as plain TOML (comments gone)."""
    text = render(plan)
    return parse_repo_config(text, "wtbox.toml"), tomllib.loads(text), text


def notes(plan) -> str:
    return "\n".join(plan.notes)


@pytest.mark.parametrize(("text", "expected"), [
    ("${A}", "a"), ("$A-$A", "a-a"), ("${NOPE:-dflt}", "dflt"), ("${EMPTY:-dflt}", "dflt"),
    ("${EMPTY-dflt}", ""), ("${NOPE-dflt}", "dflt"), ("${A:+alt}", "alt"), ("${EMPTY:+alt}", ""),
    ("${EMPTY+alt}", "alt"), ("${NOPE:-${A:-x}}", "a"), ("$$A", "$A"), ("cost $5", "cost $5"),
    ("${NOPE}", ""), ("${EMPTY:?must}", ""),
])
def test_compose_interpolation(text, expected):
    interp = Interpolation({"A": "a", "EMPTY": ""})
    assert interp(text) == expected


def test_interpolation_reports_unset_and_required():
    interp = Interpolation({"EMPTY": ""})
    interp("${NOPE} ${EMPTY:?set it} ${GONE?needed} ${OK:-fine}")
    assert interp.unset == ["NOPE"]
    assert interp.required == ["EMPTY (set it)", "GONE (needed)"]


DJANGO_COMPOSE = """
x-env: &common
  DATABASE_URL: postgres://app:app@db:5432/app
  CELERY_BROKER_URL: ${BROKER_URL:-redis://redis:6379/1}
services:
  web:
    build: .
    command: python manage.py runserver 0.0.0.0:8000
    ports: ["127.0.0.1:8000:8000/tcp"]
    environment:
      <<: *common
      REDIS_URL: redis://redis:6379/0
      EMAIL_URL: smtp://mail:1025
      TEMPLATE: "{{ not jinja }}"
    env_file: [.env.dev, {path: .env.local, required: false}]
    depends_on:
      db: {condition: service_healthy}
      redis: {condition: service_started}
      migrate: {condition: service_completed_successfully}
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:8000/health/"]
    volumes: [".:/app", "media:/media"]
    working_dir: /app/src
    cap_add: [NET_ADMIN]
  migrate:
    build: .
    command: python manage.py migrate
    environment: [DATABASE_URL=postgres://app:app@db:5432/app]
  worker:
    build: .
    command: ["celery", "-A", "proj", "worker", "--loglevel", "info"]
    environment:
      - CELERY_BROKER_URL=redis://redis:6379/1
      - DB_HOST=db
      - DB_PORT=5432
      - POSTGRES_PASSWORD=app
      - LOCAL_ONLY
    depends_on: [redis, db, web]
  db:
    image: postgres:16
    environment: {POSTGRES_USER: app, POSTGRES_PASSWORD: app, POSTGRES_DB: app}
    healthcheck: {test: ["CMD-SHELL", "pg_isready -U app"], interval: 2s}
  redis:
    image: redis:7-alpine
    ports: ["6379"]
  mail:
    image: axllent/mailpit
  search:
    image: docker.elastic.co/elasticsearch/elasticsearch:8.13.0
  debug:
    build: .
    command: sleep infinity
    profiles: [debug]
volumes:
  media:
"""


def test_compose_django_celery_redis(tmp_path):
    root = write(tmp_path, {"compose.yaml": DJANGO_COMPOSE, ".env.dev": "SECRET_KEY=dev\nAPI=http://web:8000/api\n",
                            "manage.py": "", "requirements.txt": "django\n"})
    plan = derive(root)
    cfg, raw, text = loaded(plan)
    assert plan.files == ["compose.yaml", "manage.py"]
    # containers: the database stands for db, redis and mail are backing services; elasticsearch is named
    assert cfg.database.mode == "database"
    assert {n: (b.kind, b.image) for n, b in cfg.backing.items()} == {
        "redis": ("redis", "redis:7-alpine"), "mail": ("smtp", "axllent/mailpit")}
    assert "elasticsearch" in notes(plan) and "not a kind wtbox runs per box" in notes(plan)
    # the repo's variables rewritten onto the box
    env = cfg.box.env
    assert env["DATABASE_URL"] == "{{ db.url }}"
    assert env["REDIS_URL"] == "{{ backing.redis.url }}/0"
    assert env["CELERY_BROKER_URL"] == "{{ backing.redis.url }}/1"  # from the ${BROKER_URL:-...} default
    assert env["EMAIL_URL"] == "{{ backing.mail.url }}"
    assert env["API"] == "http://127.0.0.1:{{ ports.web }}/api"  # another app service, by its port
    assert env["SECRET_KEY"] == "dev"
    assert env["TEMPLATE"] == "{% raw %}{{ not jinja }}{% endraw %}"  # the repo's braces are not wtbox's
    assert env["DB_HOST"] == "{{ db.host }}" and env["DB_PORT"] == "{{ db.port }}"
    assert env["POSTGRES_PASSWORD"] == "{{ db.password }}"
    assert "LOCAL_ONLY has no value" in notes(plan)
    # services: the port in the command becomes the box's, the healthcheck the readiness
    web, worker = cfg.services["web"], cfg.services["worker"]
    assert web.cmd == VENV + "python manage.py runserver 127.0.0.1:{{ ports.web }}"
    assert web.ready == "http://127.0.0.1:{{ ports.web }}/health/"
    assert web.env["PORT"] == "{{ ports.web }}" and web.cwd == "src"
    assert worker.cmd == VENV + "celery -A proj worker --loglevel info"
    assert worker.depends_on == ["web"]  # db and redis are ready before any service starts
    assert "debug" not in cfg.services and "profiles" in notes(plan)
    # the one-shot service others wait for is the migration; manage.py gives the test command
    assert cfg.database.migrate == 'export PATH="$PWD/.venv/bin:$PATH" && python manage.py migrate'
    assert cfg.test.cmd == VENV + "python manage.py test"
    # what is not used is named, each in one sentence
    assert "cap_add is not used" in notes(plan)
    assert "['media:/media'] are not mounted" in notes(plan)
    assert "top-level volumes" in notes(plan)
    # provenance on each line
    assert 'REDIS_URL = "{{ backing.redis.url }}/0"  # from compose.yaml services.web environment' in text
    assert "# from compose.yaml services.redis" in text
    assert raw["backing"]["redis"]["image"] == "redis:7-alpine"


def test_compose_unset_variables_and_overrides_are_named(tmp_path):
    root = write(tmp_path, {
        "docker-compose.yml": """
            services:
              app:
                build: .
                command: node server.js --port ${APP_PORT:?set APP_PORT}
                environment: {TOKEN: "${TOKEN}"}
                entrypoint: /docker-entrypoint.sh
              nocmd:
                build: ./other
            """,
        "docker-compose.override.yml": "services: {}\n"})
    plan = derive(root)
    text = notes(plan)
    assert "${TOKEN} is not set in .env" in text
    assert "APP_PORT (set APP_PORT)} is required" in text
    assert "docker-compose.override.yml is not merged" in text
    assert "entrypoint" in text
    assert "services.nocmd has no command" in text
    assert plan.services["app"].cmd.value == "node server.js --port"
    loaded(plan)


GHA = """
name: CI
on: [push, pull_request]
env:
  NODE_ENV: test
jobs:
  lint:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: npm run lint
  test:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        node-version: [20, 22]
        pg: [15, 16]
        exclude: [{node-version: 20, pg: 15}]
    services:
      postgres:
        image: postgres:${{ matrix.pg }}
        env: {POSTGRES_PASSWORD: postgres, POSTGRES_DB: app_test}
        ports: ["5432:5432"]
        options: --health-cmd pg_isready
      cache:
        image: redis:7
        ports: ["6380:6379"]
    env:
      DATABASE_URL: postgres://postgres:postgres@localhost:5432/app_test
      REDIS_URL: redis://localhost:${{ job.services.cache.ports[6379] }}
      API_KEY: ${{ secrets.API_KEY }}
      SHA: ${{ github.sha }}
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-node@v4
        with: {node-version: "${{ matrix.node-version }}"}
      - run: npm ci
      - name: Migrate
        run: npm run migrate
      - name: Run tests
        run: npm test
        env: {LOG_LEVEL: warn}
      - uses: codecov/codecov-action@v4
"""


def test_github_actions_services_matrix_and_steps(tmp_path):
    root = write(tmp_path, {".github/workflows/ci.yml": GHA, "package.json": json.dumps(
        {"scripts": {"start": "node server.js", "test": "node --test"}}), "package-lock.json": "{}"})
    plan = derive(root)
    cfg, _, text = loaded(plan)
    assert plan.files[0] == ".github/workflows/ci.yml"
    assert "job test was read" in notes(plan) and "ci.yml:lint" in notes(plan)
    assert "matrix entry taken: node-version=20, pg=16" in notes(plan)  # (20, 15) is excluded
    assert plan.database.value == "postgres:16"
    assert cfg.backing["cache"].image == "redis:7"
    assert cfg.box.env["DATABASE_URL"] == "{{ db.url }}"
    assert cfg.box.env["REDIS_URL"] == "{{ backing.cache.url }}"
    assert cfg.box.env["NODE_ENV"] == "test" and cfg.box.env["LOG_LEVEL"] == "warn"
    assert "API_KEY" not in cfg.box.env and "--secret API_KEY" in notes(plan)
    assert "SHA" not in cfg.box.env and "CI expression" in notes(plan)
    assert cfg.database.migrate == "npm run migrate"
    assert cfg.test.cmd == "npm test"
    assert '# from .github/workflows/ci.yml job test, step "Run tests"' in text
    assert any("npm ci" in m and "dependency layers" in m for m in plan.mapped)
    assert "CI sets up node (node-version 20)" in notes(plan)
    assert "codecov/codecov-action@v4 is not run" in notes(plan)
    assert "options '--health-cmd pg_isready' are docker's" in notes(plan)
    assert cfg.services["web"].cmd == "npm start"  # package.json, as no compose file declares services


GITLAB = """
variables:
  POSTGRES_DB: app
  POSTGRES_USER: runner
  POSTGRES_PASSWORD: ""
  POSTGRES_HOST_AUTH_METHOD: trust
  DATABASE_URL: "postgresql://$POSTGRES_USER@postgres:5432/$POSTGRES_DB"
default:
  image: python:3.12
  before_script:
    - pip install -r requirements.txt
.db:
  services:
    - postgres:16
    - name: redis:7
      alias: cache
stages: [lint, test]
lint:
  stage: lint
  script: [ruff check .]
test:
  extends: .db
  stage: test
  variables:
    REDIS_URL: redis://cache:6379/0
    SUITE: unit
  parallel:
    matrix:
      - PY: ["3.11", "3.12"]
  script:
    - flask --app app db upgrade
    - pytest -q
  artifacts: {paths: [report.xml]}
  rules: [{if: $CI_PIPELINE_SOURCE}]
"""


def test_gitlab_ci_services_variables_extends(tmp_path):
    root = write(tmp_path, {".gitlab-ci.yml": GITLAB, "requirements.txt": "flask\n",
                            "Procfile": "web: gunicorn app:app --bind 127.0.0.1:$PORT\nworker: rq worker\n"})
    plan = derive(root)
    cfg, _, text = loaded(plan)
    assert plan.files == [".gitlab-ci.yml", "Procfile"]
    assert "job test was read" in notes(plan)
    assert plan.database.value == "postgres:16"
    assert cfg.backing["cache"].image == "redis:7"
    assert cfg.box.env["DATABASE_URL"] == "{{ db.url }}"  # $POSTGRES_USER... expanded, then rewritten
    assert cfg.box.env["POSTGRES_DB"] == "{{ db.name }}"
    assert cfg.box.env["REDIS_URL"] == "{{ backing.cache.url }}/0"
    assert cfg.box.env["PY"] == "3.11" and "parallel matrix entry taken: PY=3.11" in notes(plan)
    assert cfg.database.migrate == 'export PATH="$PWD/.venv/bin:$PATH" && flask --app app db upgrade'
    assert cfg.test.cmd == VENV + "pytest -q"
    assert any("pip install -r requirements.txt" in m for m in plan.mapped)
    assert "artifacts, rules only mean something to a CI runner" in notes(plan)
    assert "image 'python:3.12' is the CI's" in notes(plan)
    web = cfg.services["web"]
    assert web.cmd == VENV + "gunicorn app:app --bind 127.0.0.1:$PORT"
    assert web.env["PORT"] == "{{ ports.web }}" and web.ready == "tcp:{{ ports.web }}"
    assert "worker" in cfg.services and cfg.services["worker"].ready is None
    assert "# from Procfile web" in text


def test_devcontainer_with_comments_reads_its_compose(tmp_path):
    root = write(tmp_path, {
        ".devcontainer/devcontainer.json": """{
            // JSON with comments, as VS Code writes it
            "name": "app",
            "dockerComposeFile": ["docker-compose.yml"],
            "service": "workspace",
            "postCreateCommand": "make assets",
            "containerEnv": {"FEATURE_FLAG": "on",},
            "forwardPorts": [8000],
            "features": {"ghcr.io/devcontainers/features/node:1": {}},
        }""",
        ".devcontainer/docker-compose.yml": """
            services:
              workspace: {build: ., command: sleep infinity}
              queue: {image: "rabbitmq:3-management"}
              files: {image: minio/minio}
              cache: {image: memcached:1.6}
            """})
    plan = derive(root)
    cfg, _, _ = loaded(plan)
    assert {n: b.kind for n, b in cfg.backing.items()} == {"queue": "rabbitmq", "files": "s3", "cache": "memcached"}
    assert "workspace" not in cfg.services and "is the dev container itself" in notes(plan)
    assert cfg.setup.cmd == "make assets" and cfg.box.env["FEATURE_FLAG"] == "on"
    assert "features" in notes(plan) and "forwardPorts [8000] are not forwarded" in notes(plan)
    assert cfg.database.mode == "none"  # no PostgreSQL anywhere: no database per box


def test_nothing_declared_is_empty(tmp_path):
    (tmp_path / "README.md").write_text("hi\n")
    assert derive(tmp_path).empty


def test_init_cli_explain_force_and_starter(tmp_path, run_wtbox):
    compose = "services:\n  cache: {image: 'redis:7'}\n  mysql: {image: mysql:8}\n"
    repo = write(tmp_path / "r", {"compose.yaml": compose})
    proc = run_wtbox("init", "--repo", str(repo), "--explain")
    assert not (repo / "wtbox.toml").exists()  # --explain never writes
    assert "backing    cache: redis:7 → native" in proc.stdout and "mysql" in proc.stdout
    doc = json.loads(run_wtbox("init", "--repo", str(repo), "--explain", "--json").stdout)
    assert doc["backing"]["cache"]["runtime"].startswith("native") and doc["would_write"] == "derived"
    assert any("mysql" in n for n in doc["not_mapped"])
    run_wtbox("init", "--repo", str(repo))
    text = (repo / "wtbox.toml").read_text()
    assert "[backing.cache]" in text and "# from compose.yaml services.cache" in text
    proc = run_wtbox("init", "--repo", str(repo), check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and proc.stderr.count("\n") == 1
    run_wtbox("init", "--repo", str(repo), "--force")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "starter template" in run_wtbox("init", "--repo", str(empty), "--explain").stdout
    run_wtbox("init", "--repo", str(empty))
    assert "[box]" in (empty / "wtbox.toml").read_text()


def test_init_on_a_broken_file_names_it(tmp_path, run_wtbox):
    repo = write(tmp_path, {"compose.yaml": "services: [unclosed\n", ".gitlab-ci.yml": "test:\n  script: pytest\n"})
    proc = run_wtbox("init", "--repo", str(repo), "--explain")
    assert "compose.yaml is not valid YAML at line" in proc.stdout
    assert "test       pytest" in proc.stdout
