"""The API key check (the request size limit is FastAPI's own ``max_body_size``)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the service has a key")


def keys_match(provided: str | None, expected: str) -> bool:
    """Compare in constant time, so the answer's timing says nothing about how much of a key was right."""
    return provided is not None and hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))


async def require_api_key(request: Request, provided: Annotated[str | None, Security(_api_key_header)]) -> None:
    """FastAPI dependency: 401 unless the configured key (if any) is in the ``X-API-Key`` header."""
    expected = request.app.state.settings.api_key
    if expected is not None and not keys_match(provided, expected):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing or wrong API key (header X-API-Key)",
                            headers={"WWW-Authenticate": "APIKey"})
