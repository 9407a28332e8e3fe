"""Access keys: who a request is, and which sessions it may see (no web framework here)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from config import Settings


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: what sessions record as their owner and logs show."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Caller:
    """The identity of a request: the key's id (None without keys) and whether it is an admin."""

    owner: str | None
    admin: bool = False

    def may_access(self, owner: str | None) -> bool:
        return self.admin or owner == self.owner


#: Without keys there is one trusted user, who sees everything.
LOCAL_USER = Caller(owner=None, admin=True)


class Unauthorized(Exception):
    """A missing or unknown key (the key itself is never part of the message)."""


class KeyRing:
    """The configured keys, kept only as SHA-256 digests and compared in constant time."""

    def __init__(self, settings: Settings):
        users, admins = settings.access_keys()
        self._entries: list[tuple[bytes, str, bool]] = []
        for key, admin in [(k, False) for k in users] + [(k, True) for k in admins]:
            digest = hashlib.sha256(key.encode()).digest()
            self._entries.append((digest, key_id(key), admin))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, presented: str | None) -> Caller:
        if not self.enabled:
            return LOCAL_USER
        if not presented:
            raise Unauthorized("this server needs an access key: send 'Authorization: Bearer "
                               "<key>' (or 'X-API-Key: <key>')")
        digest = hashlib.sha256(presented.encode()).digest()
        found: Caller | None = None
        # Every entry is compared, so the time taken does not say which key came close.
        for entry_digest, owner, admin in self._entries:
            if hmac.compare_digest(digest, entry_digest) and found is None:
                found = Caller(owner=owner, admin=admin)
        if found is None:
            raise Unauthorized("the access key is not valid")
        # A key listed both as user and admin is an admin.
        if not found.admin and any(a and o == found.owner for _, o, a in self._entries):
            found = Caller(owner=found.owner, admin=True)
        return found
