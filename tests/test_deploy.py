"""docker-compose.yml names only things that exist in the project.

No Docker engine runs here, so the deployment is checked statically: every `loopservice`
command and option it runs parses with the real CLI, every `LOOP_*` variable is a `Settings`
field with a valid value, every file it mounts or builds from exists, Prometheus scrapes every
Loop Service process on the port that process listens on, and the provisioned Grafana dashboard
queries only metrics (and labels) the project's code registers. `problems()` returns every
mismatch; the mutation tests show that each kind of slip is caught.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.metrics import MetricWrapperBase
from pydantic import ValidationError

from loopservice import worker as worker_module
from loopservice.cli import main as cli_main
from loopservice.domain.signals import signal_models
from loopservice.infra.alerts import AlertMetrics
from loopservice.infra.metrics import Metrics
from loopservice.infra.settings import ENV_PREFIX, Settings, read_tokens_file

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT_PACKAGES = ("domain", "streams", "projections", "infra", "loopservice")

# Series Prometheus itself adds to every scrape, with their labels.
SYNTHETIC_SERIES = {
    name: frozenset({"job", "instance"})
    for name in ("up", "scrape_duration_seconds", "scrape_samples_scraped")
}
TARGET_LABELS = frozenset({"job", "instance"})
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)


# --- loading ---------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any) -> Any:
    """The compose file as `docker compose` reads it with no variables set in the environment:
    `${NAME:-default}` gives the default, `${NAME}` the empty string, `${NAME:?why}` is an error
    (the file must work without a `.env`)."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
        if op in ("-", ":-"):
            return arg
        if op in ("?", ":?"):
            raise ValueError(f"${{{name}}} is required: {arg}")
        return ""

    return _VARIABLE.sub(substitute, value)


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    result = interpolate(data)
    assert isinstance(result, dict)
    return result


def load_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


# --- what the project registers ----------------------------------------------------------------

_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
_DECLARED = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][\w:]*)[\"']"
)


def project_collectors() -> list[MetricWrapperBase]:
    holders = [vars(Metrics()), vars(AlertMetrics()), vars(worker_module)]
    return [c for h in holders for c in h.values() if isinstance(c, MetricWrapperBase)]


def registered_series() -> dict[str, frozenset[str]]:
    """Every series name the project's processes expose, with its label names."""
    series: dict[str, frozenset[str]] = dict(SYNTHETIC_SERIES)
    for c in project_collectors():
        labels = frozenset(c._labelnames)
        for suffix in _SAMPLE_SUFFIXES[str(c._type)]:
            series[c._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def declared_metric_names() -> set[str]:
    """`loop_*` metric names declared anywhere in the project's source."""
    files = {p.resolve() for pkg in PROJECT_PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    names = set()
    for path in files:
        for name in _DECLARED.findall(path.read_text(encoding="utf-8")):
            if name.startswith("loop_"):
                names.add(name.removesuffix("_total"))
    return names


SIGNAL_TYPES = frozenset(m.model_fields["type"].default for m in signal_models())
SIGNAL_SERIES = frozenset({"loop_sla_signals_total", "loop_signals_total"})  # type = signal type


# --- compose helpers ---------------------------------------------------------------------------


def argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of each volume entry: type `bind` or `volume`."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((entry.get("type", "volume"), str(entry.get("source", "")), entry["target"]))
            continue
        parts = str(entry).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


def host_source(source: str) -> Path:
    return Path(source) if Path(source).is_absolute() else ROOT / source


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where `container_path` comes from on the host, through the service's bind mounts."""
    wanted = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for kind, source, target in mounts(service):
        t = PurePosixPath(target)
        if kind == "bind" and (wanted == t or t in wanted.parents):
            rest = wanted.relative_to(t)
            if best is None or len(t.parts) > best[0]:
                best = (len(t.parts), host_source(source) / rest)
    return None if best is None else best[1]


def published_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports named in `ports` and `expose`."""
    ports = set()
    for entry in [*service.get("ports", []), *service.get("expose", [])]:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].split(":")[-1]))
    return ports


def by_image(compose: dict[str, Any], prefix: str) -> list[str]:
    return [n for n, s in compose["services"].items() if str(s.get("image", "")).startswith(prefix)]


def loop_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if argv(s)[:1] == ["loopservice"]}


def parse_cli(args: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Resolves `loopservice ARGS` to its command and parsed parameters, as the CLI would
    (unknown commands, unknown options and bad values raise click errors)."""
    command: click.Command = cli_main
    ctx = click.Context(command, info_name="loopservice")
    rest = list(args)
    while isinstance(command, click.Group):
        if not rest:
            raise click.UsageError(f"{ctx.command_path} needs a command")
        name, rest = rest[0], rest[1:]
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no such command {ctx.command_path} {name}")
        command = sub
        ctx = click.Context(command, info_name=name, parent=ctx)
    ctx = command.make_context(ctx.info_name, rest, parent=ctx.parent)
    return command, dict(ctx.params)


# --- the checks --------------------------------------------------------------------------------


def check_references(compose: dict[str, Any]) -> list[str]:
    out = []
    services = compose.get("services", {})
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            if dep not in services:
                out.append(f"{name}: depends_on unknown service {dep!r}")
        for kind, source, _ in mounts(service):
            if kind == "volume" and source and source not in declared:
                out.append(f"{name}: named volume {source!r} is not declared under volumes")
            if kind == "bind" and not host_source(source).exists():
                out.append(f"{name}: mounts {source!r}, which does not exist")
    return out


def check_build(compose: dict[str, Any]) -> list[str]:
    out = []
    for name, service in loop_services(compose).items():
        build = service.get("build")
        if build is None:
            out.append(f"{name}: runs loopservice but does not build the project's image")
            continue
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        if not dockerfile.is_file():
            out.append(f"{name}: no Dockerfile at {dockerfile}")
            continue
        text = dockerfile.read_text(encoding="utf-8")
        if not re.search(r"^FROM python:3\.11-slim\b", text, re.M):
            out.append(f"{dockerfile.name}: not FROM python:3.11-slim")
        if not re.search(r"pip install (--\S+ )*\.(\s|$|&)", text):
            out.append(f"{dockerfile.name}: does not `pip install .`")
        fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
        for key in sorted(set(re.findall(r"\b(LOOP_\w+)=", text)) - fields):
            out.append(f"{dockerfile.name}: ENV {key} is not a Settings field")
        for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
            args = [a for a in line.split() if not a.startswith("--")]
            for src in args[:-1]:
                if not (context / src).exists():
                    out.append(f"{dockerfile.name}: COPY source {src!r} does not exist")
    return out


def check_commands(compose: dict[str, Any]) -> list[str]:
    out = []
    for name, service in compose["services"].items():
        args = argv(service)
        if args[:1] != ["loopservice"] and service.get("build"):
            out.append(f"{name}: a project service must run `loopservice <command>`: {args}")
        if args[:1] != ["loopservice"]:
            continue
        try:
            parse_cli(args[1:])
        except click.ClickException as exc:
            out.append(f"{name}: `{shlex.join(args)}`: {exc.format_message()}")
    return out


def check_settings(compose: dict[str, Any]) -> list[str]:
    out: list[str] = []
    fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    services = compose["services"]
    seen: dict[str, Settings] = {}
    for name, service in services.items():
        env = environment(service)
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in fields)
        out.extend(f"{name}: {k} is not a Settings field" for k in unknown)
        if name not in loop_services(compose) or unknown:
            continue
        try:
            seen[name] = Settings.from_env(env)
        except (ValidationError, ValueError) as exc:
            out.append(f"{name}: invalid LOOP_* settings: {exc}")
    for attr in ("engine", "kafka_bootstrap", "kafka_partitions", "kafka_topic_prefix"):
        values = {getattr(s, attr) for s in seen.values()}
        if len(values) > 1:
            out.append(f"the Loop Service processes disagree on {attr}: {sorted(map(str, values))}")
    for name, settings in seen.items():
        if settings.engine != "kafka":
            out.append(f"{name}: LOOP_ENGINE must be kafka in this deployment")
        out.extend(f"{name}: {p}" for p in _check_bootstrap(compose, settings.kafka_bootstrap))
        if settings.projections_url:
            out.extend(f"{name}: {p}" for p in _check_postgres(compose, settings.projections_url))
        tokens = environment(services[name]).get("LOOP_TOKENS_FILE")
        if tokens:
            source = host_path(services[name], tokens)
            if source is None or not source.is_file():
                out.append(f"{name}: LOOP_TOKENS_FILE {tokens} is not a mounted file")
            else:
                try:
                    read_tokens_file(source)
                except (ValueError, ValidationError) as exc:
                    out.append(f"{name}: {source} does not parse as a tokens file: {exc}")
    return out


def _check_bootstrap(compose: dict[str, Any], bootstrap: str) -> list[str]:
    out = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        service = compose["services"].get(host)
        if service is None:
            out.append(f"Kafka bootstrap {server!r} is not a compose service")
            continue
        advertised = environment(service).get("KAFKA_ADVERTISED_LISTENERS", "")
        if not re.search(rf"://{re.escape(host)}:{port}\b", advertised):
            out.append(f"Kafka bootstrap {server!r} is not among {host}'s advertised listeners")
    return out


def _check_postgres(compose: dict[str, Any], url: str) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return [f"LOOP_PROJECTIONS_URL {url!r} is not a postgresql:// URL"]
    service = compose["services"].get(parts.hostname or "")
    if service is None:
        return [f"LOOP_PROJECTIONS_URL names host {parts.hostname!r}, not a compose service"]
    env = environment(service)
    expected = {
        "port": (parts.port or 5432, int(env.get("PGPORT", 5432))),
        "user": (parts.username, env.get("POSTGRES_USER", "postgres")),
        "password": (parts.password, env.get("POSTGRES_PASSWORD")),
        "database": (parts.path.lstrip("/"), env.get("POSTGRES_DB") or env.get("POSTGRES_USER")),
    }
    return [
        f"LOOP_PROJECTIONS_URL {what} {got!r} differs from {parts.hostname}'s {want!r}"
        for what, (got, want) in expected.items()
        if got != want
    ]


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for name, service in loop_services(compose).items():
        try:
            command, params = parse_cli(argv(service)[1:])
        except click.ClickException:
            continue
        if command.name == "worker":
            found[name] = params
    return found


def check_workers(compose: dict[str, Any]) -> list[str]:
    found = workers(compose)
    out = []
    if len(found) < 2:
        out.append(f"expected two `loopservice worker` services, found {sorted(found)}")
    app_ids = {p["app_id"] for p in found.values()}
    if len(app_ids) > 1:
        out.append(f"the workers must share one --app-id (consumer group), got {sorted(app_ids)}")
    out.extend(f"{n}: --metrics-port is off" for n, p in found.items() if not p["metrics_port"])
    return out


def metrics_ports(compose: dict[str, Any]) -> dict[str, int]:
    """The port each Loop Service process serves /metrics on."""
    ports = {}
    for name, service in loop_services(compose).items():
        try:
            command, params = parse_cli(argv(service)[1:])
            settings = Settings.from_env(environment(service))
        except (click.ClickException, ValueError):
            continue
        if command.name == "run":
            ports[name] = params["port"] or settings.http_port
        elif command.name == "worker" and params["metrics_port"]:
            ports[name] = params["metrics_port"]
    return ports


def listening_ports(compose: dict[str, Any], name: str) -> set[int]:
    ports = published_ports(compose["services"][name])
    if name in metrics_ports(compose):
        ports.add(metrics_ports(compose)[name])
    return ports


def prometheus_config(compose: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    names = by_image(compose, "prom/prometheus")
    if len(names) != 1:
        return None, [f"expected one prom/prometheus service, found {names}"]
    service = compose["services"][names[0]]
    flags = dict(a.split("=", 1) for a in argv(service) if a.startswith("--") and "=" in a)
    path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    source = host_path(service, path)
    if source is None or not source.is_file():
        return None, [f"{names[0]}: --config.file {path} is not a mounted file"]
    return load_file(source), []


def check_prometheus(compose: dict[str, Any]) -> list[str]:
    config, out = prometheus_config(compose)
    if config is None:
        return out
    scraped: set[tuple[str, int]] = set()
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                host, _, port = str(target).rpartition(":")
                if host not in compose["services"]:
                    out.append(f"prometheus job {job['job_name']}: {target} is not a service")
                elif int(port) not in listening_ports(compose, host):
                    out.append(
                        f"prometheus job {job['job_name']}: {target}, but {host} listens on "
                        f"{sorted(listening_ports(compose, host))}"
                    )
                scraped.add((host, int(port)))
    for name, metrics_port in metrics_ports(compose).items():
        if (name, metrics_port) not in scraped:
            out.append(f"prometheus does not scrape {name} on its metrics port {metrics_port}")
    return out


def grafana_files(compose: dict[str, Any]) -> tuple[list[Any], dict[str, Any], list[str]]:
    """(datasources, dashboards by file name, problems) provisioned into the Grafana service."""
    names = by_image(compose, "grafana/grafana")
    if len(names) != 1:
        return [], {}, [f"expected one grafana/grafana service, found {names}"]
    service = compose["services"][names[0]]
    env = environment(service)
    provisioning = env.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    out: list[str] = []
    datasources: list[Any] = []
    dashboards: dict[str, Any] = {}
    folder = host_path(service, f"{provisioning}/datasources")
    for path in sorted(folder.glob("*.y*ml")) if folder and folder.is_dir() else []:
        datasources.extend(load_file(path).get("datasources", []))
    if not datasources:
        out.append(f"grafana: no datasource provisioned under {provisioning}/datasources")
    folder = host_path(service, f"{provisioning}/dashboards")
    providers = [
        provider
        for path in (sorted(folder.glob("*.y*ml")) if folder and folder.is_dir() else [])
        for provider in load_file(path).get("providers", [])
    ]
    if not providers:
        out.append(f"grafana: no dashboard provider under {provisioning}/dashboards")
    for provider in providers:
        where = provider.get("options", {}).get("path", "")
        source = host_path(service, where)
        if source is None or not source.is_dir():
            out.append(f"grafana: dashboard provider path {where!r} is not a mounted folder")
            continue
        for path in sorted(source.glob("*.json")):
            try:
                dashboards[path.name] = load_file(path)
            except json.JSONDecodeError as exc:
                out.append(f"grafana: {path.name} is not valid JSON: {exc}")
    if not dashboards and providers:
        out.append("grafana: the dashboard providers find no dashboard")
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and not ((p := host_path(service, home)) and p.is_file()):
        out.append(f"grafana: home dashboard {home} is not a mounted file")
    return datasources, dashboards, out


def check_grafana(compose: dict[str, Any]) -> list[str]:
    datasources, dashboards, out = grafana_files(compose)
    uids = set()
    for source in datasources:
        uids.add(source.get("uid"))
        url = urlsplit(source.get("url", ""))
        host, port = url.hostname or "", url.port or 80
        if source.get("type") != "prometheus":
            out.append(f"grafana datasource {source.get('name')}: not of type prometheus")
        elif host not in compose["services"]:
            out.append(f"grafana datasource url {source.get('url')}: {host} is not a service")
        elif port not in listening_ports(compose, host):
            out.append(f"grafana datasource url {source.get('url')}: {host} has no port {port}")
    config, _ = prometheus_config(compose)
    jobs = {j["job_name"] for j in (config or {}).get("scrape_configs", [])}
    for file, dashboard in dashboards.items():
        out.extend(f"{file}: {p}" for p in check_dashboard(dashboard, uids, jobs))
    return out


def panels(container: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in container.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


_MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_parts(expr: str) -> tuple[set[str], set[str], list[tuple[str, str, str]]]:
    """(series names, grouping labels, label matchers) of a PromQL expression."""
    matchers = [m for block in re.findall(r"\{([^}]*)\}", expr) for m in _MATCHER.findall(block)]
    rest = re.sub(r"\{[^}]*\}|\"(?:[^\"\\]|\\.)*\"|\[[^\]]*\]|\$\{?\w+\}?", " ", expr)
    grouping = {label.strip() for g in _GROUPING.findall(rest) for label in g.split(",")}
    rest = _GROUPING.sub(" ", rest)
    names = {
        word
        for word in re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", rest)
        if word.lower() not in PROMQL_WORDS
    }
    return names, grouping - {""}, matchers


def check_dashboard(dashboard: dict[str, Any], uids: set[Any], jobs: set[str]) -> list[str]:
    series = registered_series()
    out = []
    if not dashboard.get("uid") or not dashboard.get("title"):
        out.append("a provisioned dashboard needs a uid and a title")
    used: set[str] = set()
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", panel.get("id"))
        targets = panel.get("targets", [])
        if not targets:
            out.append(f"panel {title!r} has no query")
        for target in targets:
            source = target.get("datasource") or panel.get("datasource") or {}
            if source.get("uid") not in uids:
                out.append(f"panel {title!r}: datasource {source} is not provisioned")
            expr = target.get("expr", "")
            names, grouping, matchers = promql_parts(expr)
            unknown = sorted(n for n in names if n not in series)
            out.extend(f"panel {title!r}: {n} is not a metric of the project" for n in unknown)
            if not names:
                out.append(f"panel {title!r}: {expr!r} queries no metric")
            used |= names
            allowed = set(TARGET_LABELS).union(*(series.get(n, frozenset()) for n in names))
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            for label in sorted((grouping | legend | {m[0] for m in matchers}) - allowed):
                out.append(f"panel {title!r}: label {label!r} is not on {sorted(names)}")
            for label, op, value in matchers:
                values = set(value.split("|")) if op.endswith("~") else {value}
                known = (
                    jobs
                    if label == "job"
                    else SIGNAL_TYPES
                    if label == "type" and names & SIGNAL_SERIES
                    else None
                )
                if known is not None and not values <= known:
                    out.append(f"panel {title!r}: {label} {sorted(values - known)} unknown")
    for needed in ("loop_sla_signals_total", "loop_sla_open_clocks", "loop_ingest_events_total"):
        if needed not in used:
            out.append(f"the dashboard shows no {needed} (SLA and throughput)")
    return out


CHECKS = (
    check_references,
    check_build,
    check_commands,
    check_settings,
    check_workers,
    check_prometheus,
    check_grafana,
)


def problems(compose: dict[str, Any]) -> list[str]:
    return [p for check in CHECKS for p in check(compose)]


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_compose_names_only_what_exists(compose: dict[str, Any], check: Any) -> None:
    assert check(compose) == []


def test_the_deployment_has_every_part(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert by_image(compose, "apache/kafka"), "a Kafka broker"
    kafka = environment(services[by_image(compose, "apache/kafka")[0]])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft"
    assert by_image(compose, "postgres"), "PostgreSQL"
    commands = sorted(argv(s)[1] for s in loop_services(compose).values())
    assert commands == ["run", "worker", "worker"]
    assert by_image(compose, "prom/prometheus") and by_image(compose, "grafana/grafana")


def test_every_declared_metric_is_known_to_this_test() -> None:
    """A metric declared in a module this test does not read would escape the dashboard check."""
    assert declared_metric_names() == {c._name for c in project_collectors()}


def _remount(service: dict[str, Any], target: str, source: str) -> None:
    service["volumes"] = [
        v if not str(v).split(":")[1:2] == [target] else f"{source}:{target}:ro"
        for v in service["volumes"]
    ]


def _edit_grafana_dashboard(compose: dict[str, Any], tmp_path: Path, old: str, new: str) -> None:
    grafana = compose["services"][by_image(compose, "grafana/grafana")[0]]
    target = "/etc/grafana/dashboards"
    source = host_path(grafana, target)
    assert source is not None
    folder = tmp_path / "dashboards"
    folder.mkdir()
    texts = {path.name: path.read_text(encoding="utf-8") for path in source.glob("*.json")}
    assert any(old in text for text in texts.values()), f"{old!r} in no dashboard"
    for name, text in texts.items():
        (folder / name).write_text(text.replace(old, new), encoding="utf-8")
    _remount(grafana, target, str(folder))


Mutation = Callable[[dict[str, Any], Path], None]


def _set_arg(service: dict[str, Any], old: str, new: str) -> None:
    """Replaces the argument `old`, or the value of the option `old=` (`--app-id=`)."""
    args = argv(service)
    if old.endswith("="):
        at = args.index(old[:-1]) + 1
    else:
        at = args.index(old)
    service["command"] = [*args[:at], new, *args[at + 1 :]]


def _env(service: str, **values: str) -> Mutation:
    return lambda c, _: c["services"][service]["environment"].update(values)


def _arg(service: str, old: str, new: str) -> Mutation:
    return lambda c, _: _set_arg(c["services"][service], old, new)


def _dashboard(old: str, new: str) -> Mutation:
    return lambda c, t: _edit_grafana_dashboard(c, t, old, new)


def _drop_worker(compose: dict[str, Any], _: Path) -> None:
    compose["services"].pop("worker-2")


def _move_prometheus_config(compose: dict[str, Any], _: Path) -> None:
    _remount(compose["services"]["prometheus"], "/etc/prometheus/prometheus.yml", "./nowhere.yml")


# name: (how to break the deployment, what the report must then say)
MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "command typo": (_arg("worker-1", "worker", "wroker"), "no such command loopservice wroker"),
    "option typo": (
        _arg("worker-2", "--metrics-port", "--metric-port"),
        "No such option: --metric-port",
    ),
    "bad option value": (_arg("worker-1", "9100", "nine"), "'nine' is not a valid integer"),
    "unknown setting": (_env("api", LOOP_ENGIN="kafka"), "LOOP_ENGIN is not a Settings field"),
    "invalid setting value": (_env("api", LOOP_ENGINE="kafak"), "invalid LOOP_* settings"),
    "missing mount": (_move_prometheus_config, "mounts './nowhere.yml', which does not exist"),
    "one worker": (_drop_worker, "expected two `loopservice worker` services"),
    "two consumer groups": (
        _arg("worker-2", "--app-id=", "other"),
        "the workers must share one --app-id",
    ),
    "api port not scraped": (
        _env("api", LOOP_HTTP_PORT="8081"),
        "prometheus does not scrape api on its metrics port 8081",
    ),
    "metric typo": (
        _dashboard("loop_sla_open_clocks", "loop_sla_open_clock"),
        "loop_sla_open_clock is not a metric of the project",
    ),
    "label typo": (_dashboard("by (metric,", "by (metrik,"), "label 'metrik' is not on"),
    "unknown signal type": (
        _dashboard(r"sla.breached\"", r"sla.breach\""),
        "['sla.breach'] unknown",
    ),
    "wrong bootstrap": (
        _env("worker-1", LOOP_KAFKA_BOOTSTRAP="kafka:9093"),
        "'kafka:9093' is not among kafka's advertised listeners",
    ),
    "wrong database": (
        _env("api", LOOP_PROJECTIONS_URL="postgresql://loop:loop@postgres:5432/loops"),
        "LOOP_PROJECTIONS_URL database 'loops' differs",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_slip_is_caught(compose: dict[str, Any], tmp_path: Path, mutation: str) -> None:
    broken = copy.deepcopy(compose)
    mutate, expected = MUTATIONS[mutation]
    mutate(broken, tmp_path)
    found = problems(broken)
    assert any(expected in p for p in found), f"{mutation}: {expected!r} not in {found}"
