"""API keys: `Authorization: Bearer <key>` maps to an org id.

Keys are kept only as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from outbox_app.api.errors import ApiError


class ApiKeys:
    """The configured keys, parsed from `key1:org1,key2:org2`."""

    def __init__(self, spec: str) -> None:
        self._digests: list[tuple[bytes, str]] = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, org = item.partition(":")
            if not sep or not key or not org:
                raise ValueError("OUTBOX_API_KEYS entries must look like key:org")
            self._digests.append((hashlib.sha256(key.encode()).digest(), org))

    def org_for(self, authorization: str | None) -> str:
        """The org id of a bearer token, or an ApiError 401."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer API key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        org = None
        for known, known_org in self._digests:  # no early exit: constant time over all keys
            if hmac.compare_digest(digest, known):
                org = known_org
        if org is None:
            raise ApiError(401, "unauthorized", "unknown API key")
        return org
