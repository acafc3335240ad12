"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``.

Secrets are ``whsec_<base64 key>`` with at least 24 random bytes. A source holding several
secrets (whitespace separated: old and new during a rotation) signs with each, and the
signatures travel space separated in one header, so a receiver that knows either verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24


class InvalidSecret(ValueError):
    pass


def parse_secrets(text: str) -> list[bytes]:
    """The keys of every ``whsec_`` secret in ``text`` (whitespace separated)."""
    keys: list[bytes] = []
    for token in text.split():
        if not token.startswith(SECRET_PREFIX):
            raise InvalidSecret("a webhook secret must look like whsec_<base64>")
        try:
            encoded = token[len(SECRET_PREFIX):]
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSecret("a webhook secret's part after whsec_ must be base64") from None
        if len(key) < MIN_SECRET_BYTES:
            raise InvalidSecret(f"a webhook secret must hold at least {MIN_SECRET_BYTES} "
                                f"random bytes, this one holds {len(key)}")
        keys.append(key)
    if not keys:
        raise InvalidSecret("no webhook secret given")
    return keys


def new_secret(num_bytes: int = 32) -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(num_bytes)).decode()


def signature_header(keys: list[bytes], webhook_id: str, timestamp_s: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp_s}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys)
