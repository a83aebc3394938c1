"""Bearer-token authentication and scope checks for the HTTP API.

A token grants one tenant and a set of scopes (`ingest`, `read`, `admin`); even `admin` acts
only within its own tenant. Tokens are held as SHA-256 digests, so a lookup never compares
secrets byte by byte and a memory dump of the registry does not reveal them.
Routes depend on `require_scope(...)`; the registry lives on `app.state.tokens`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loopservice.infra.settings import Scope, TokenGrant


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenRegistry:
    def __init__(self, grants: Iterable[TokenGrant]) -> None:
        self._by_digest: dict[bytes, Principal] = {}
        for grant in grants:
            principal = Principal(grant.tenant, frozenset(grant.scopes))
            digest = _digest(grant.token.get_secret_value())
            known = self._by_digest.get(digest)
            if known is not None and known != principal:
                raise ValueError("a token is granted twice, with different tenants or scopes")
            self._by_digest[digest] = principal

    def authenticate(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))


_bearer = HTTPBearer(auto_error=False, description="An API token: Authorization: Bearer <token>")


def require_scope(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: 401 without a known bearer token, 403 without `scope`."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        registry: TokenRegistry = request.app.state.tokens
        principal = registry.authenticate(credentials.credentials)
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if not principal.may(scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token lacks the {scope!r} scope")
        return principal

    return dependency
