"""API keys and refresh tokens: their formats, how they are made, and how they are stored.

A key is shown once and stored only as its SHA-256; a lookup is by that hash. Keys are
128-bit (`rdkey_` + 32 hex) and refresh tokens 512-bit (`rdrt_` + 128 hex), so an
unsalted fast hash is enough: there is nothing to guess.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

API_KEY_PREFIX = "rdkey_"
REFRESH_TOKEN_PREFIX = "rdrt_"
API_KEY_PATTERN = re.compile(r"rdkey_[0-9a-f]{32}")
REFRESH_TOKEN_PATTERN = re.compile(r"rdrt_[0-9a-f]{128}")


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_hex(16)


def new_refresh_token() -> str:
    return REFRESH_TOKEN_PREFIX + secrets.token_hex(64)


def is_api_key(text: str) -> bool:
    """Whether `text` has the form of an API key (it may still be unknown)."""
    return API_KEY_PATTERN.fullmatch(text) is not None


def is_refresh_token(text: str) -> bool:
    """Whether `text` has the form of a refresh token (it may still be unknown)."""
    return REFRESH_TOKEN_PATTERN.fullmatch(text) is not None


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a key or token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Compare two secrets (or their hashes) in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def basic_password(authorization: str | None) -> str | None:
    """The password of an `Authorization: Basic base64(user:password)` header, or None.

    What a browser sends after its sign-in prompt: the status page takes the operator
    token as the password (any user name)."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
