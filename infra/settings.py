"""Settings: one frozen pydantic model, read from `LOOP_*` environment variables.

Every field `name` is read from `LOOP_<NAME>` (`LOOP_DATA_DIR`, `LOOP_LOG_URL`,
`LOOP_HTTP_HOST`, `LOOP_HTTP_PORT`, `LOOP_TOKENS_FILE`, `LOOP_TOKENS`, `LOOP_DEV_TENANT`,
`LOOP_ALLOWED_LATENESS_S`, `LOOP_CLOCK_SKEW_TOLERANCE_S`, `LOOP_MAX_BATCH_EVENTS`,
`LOOP_MAX_REQUEST_BYTES`, `LOOP_PROJECTIONS_URL`, `LOOP_ENGINE` (`embedded` or `kafka`),
`LOOP_KAFKA_BOOTSTRAP`, `LOOP_KAFKA_PARTITIONS`, `LOOP_KAFKA_TOPIC_PREFIX`).

API tokens are entries `{token, tenant, scopes}` with scopes drawn from `ingest`, `read`,
`admin`. They come from `LOOP_TOKENS` (a JSON list of entries) and/or `LOOP_TOKENS_FILE`
(TOML: `[[tokens]]` tables; JSON: a list or `{"tokens": [...]}`). When neither is set,
`load_tokens` falls back to development tokens kept in `<data_dir>/dev-tokens.json`: generated
once (random, file mode 0600) for tenant `dev_tenant` — one token with every scope, one
read-only — and reused afterwards. `TokenSource.notice()` is the line a server prints at start
to say where they are; token values themselves are never logged or printed (they are
`SecretStr`, so not even a repr shows them).
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

ENV_PREFIX = "LOOP_"

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")


class TokenGrant(BaseModel):
    """One API token: the tenant it acts for and what it may do there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr
    tenant: str = Field(min_length=1, max_length=200)
    scopes: frozenset[Scope] = Field(min_length=1)

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("a token must have at least 16 characters")
        return value


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Path("./var")
    log_url: str = "sqlite:///var/loop.db"
    engine: Literal["embedded", "kafka"] = "embedded"
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_partitions: int = Field(default=8, ge=1)
    kafka_topic_prefix: str = ""  # topics are <prefix>loop.interactions, … (one set per cluster)
    projections_url: str = ""  # "" = the log's own SQLite file; sqlite:///… or postgresql://…
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    tokens_file: Path | None = None
    tokens: tuple[TokenGrant, ...] = ()
    dev_tenant: str = Field(default="acme", min_length=1)
    allowed_lateness_s: float = Field(default=1.0, ge=0)
    clock_skew_tolerance_s: float = Field(default=300.0, ge=0)
    max_batch_events: int = Field(default=10_000, ge=1)
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by `LOOP_*` variables, overridden by keyword arguments."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                data[name] = env[key]
        if "tokens" in data:
            try:
                data["tokens"] = _token_entries(json.loads(data["tokens"]))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{ENV_PREFIX}TOKENS is not valid JSON: {exc.msg}") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    @property
    def allowed_lateness(self) -> timedelta:
        return timedelta(seconds=self.allowed_lateness_s)

    @property
    def clock_skew_tolerance(self) -> timedelta:
        return timedelta(seconds=self.clock_skew_tolerance_s)

    def sqlite_path(self) -> Path:
        """The file of a `sqlite:///relative` or `sqlite:////absolute` log URL."""
        prefix = "sqlite:///"
        if not self.log_url.startswith(prefix):
            raise ValueError(f"not an embedded SQLite log URL: {self.log_url!r}")
        return Path(self.log_url[len(prefix) :])


@dataclass(frozen=True, slots=True)
class TokenSource:
    grants: tuple[TokenGrant, ...]
    origin: Literal["configured", "dev"]
    dev_file: Path | None = None

    def notice(self) -> str | None:
        """What to tell the operator at start when development tokens are in use."""
        if self.origin != "dev":
            return None
        tenants = sorted({g.tenant for g in self.grants})
        return (
            f"No API tokens configured ({ENV_PREFIX}TOKENS / {ENV_PREFIX}TOKENS_FILE): using "
            f"development tokens for tenant(s) {', '.join(tenants)} from {self.dev_file} "
            f"(the first has every scope)."
        )


def load_tokens(settings: Settings) -> TokenSource:
    grants = list(settings.tokens)
    if settings.tokens_file is not None:
        grants.extend(read_tokens_file(settings.tokens_file))
    if grants:
        return TokenSource(tuple(grants), "configured")
    path = settings.data_dir / "dev-tokens.json"
    return TokenSource(tuple(dev_tokens(path, settings.dev_tenant)), "dev", path)


def read_tokens_file(path: Path) -> list[TokenGrant]:
    text = path.read_text(encoding="utf-8")
    data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    return _token_entries(data)


def dev_tokens(path: Path, tenant: str) -> list[TokenGrant]:
    """The development tokens stored at `path`, generated there first if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [
            {"token": secrets.token_urlsafe(24), "tenant": tenant, "scopes": list(SCOPES)},
            {"token": secrets.token_urlsafe(24), "tenant": tenant, "scopes": ["read"]},
        ]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"tokens": entries}, f, indent=2)
    return read_tokens_file(path)


def _token_entries(data: Any) -> list[TokenGrant]:
    if isinstance(data, dict):
        data = data.get("tokens", [])
    if not isinstance(data, list):
        raise ValueError("tokens must be a list of {token, tenant, scopes} entries")
    return [TokenGrant.model_validate(entry) for entry in data]
