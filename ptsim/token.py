"""Replay tokens: one copy-pasteable string naming a schedule.

Format 2: "pts2." + base64url(zlib(JSON)) where the JSON holds the scenario digest (after
variant and overrides: Scenario.digest), the model version it was made under, the variant, the
overrides, the user modules the scenario uses (name and source hash) and the choices (bytes,
zlib'd, base64).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

PREFIX = "pts2."
_OLD_PREFIXES = ("pts1.",)


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    digest: str
    model: str
    variant: str | None
    overrides: tuple[str, ...]
    choices: tuple[int, ...]
    modules: tuple[tuple[str, str], ...] = ()  # (user module, source hash)

    def encode(self) -> str:
        if any(c > 255 for c in self.choices):
            raise ValueError("a choice index above 255 cannot be encoded")
        payload = {"h": self.digest, "m": self.model, "v": self.variant,
                   "o": list(self.overrides), "u": [list(m) for m in self.modules],
                   "c": base64.b64encode(zlib.compress(bytes(self.choices), 9)).decode()}
        raw = zlib.compress(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode(), 9)
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(text: str) -> Token:
    text = text.strip()
    if text.startswith(_OLD_PREFIXES):
        raise TokenError(f"token format {text[:4]} is from ptsim 0.1, whose scenario hash "
                         "covered every config default; run the schedule again for a pts2 token")
    if not text.startswith(PREFIX):
        raise TokenError(f"not a ptsim token (expected it to start with {PREFIX!r})")
    body = text[len(PREFIX):]
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload = json.loads(raw)
        choices = tuple(zlib.decompress(base64.b64decode(payload["c"])))
        modules = tuple((str(name), str(digest)) for name, digest in payload.get("u", ()))
        return Token(str(payload["h"]), str(payload["m"]), payload["v"], tuple(payload["o"]),
                     choices, modules)
    except (binascii.Error, zlib.error, ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"the token is damaged ({exc.__class__.__name__})") from None
