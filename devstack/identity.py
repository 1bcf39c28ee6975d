"""Who is calling, in the local stack: the production model's service accounts, a local operator, and
the tokens that carry them.

Google identifies a caller by its credentials: a function by its service account's access token on
API calls, and by an OIDC ID token (`iss`, `aud`, `email`, `exp`) when Cloud Tasks, Cloud Scheduler
or Eventarc invoke it. The local stack does the same with unsigned JWTs (`alg: none`): the stack
mints an access token per function (handed to the function process as `UPCFAN_LOCAL_ACCESS_TOKEN`,
used by `shared.clients` as ordinary OAuth credentials) and one for the operator
(`UPCFAN_OPERATOR_TOKEN` in `.local/stack.env`, used by the CLI, tests and scripts); the emulators
and gates read them back with `claims()`. Unsigned means forgeable: this models who is who so that a
missing grant fails locally as it would in Google Cloud; it is no security boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

# The `iss` of every token the local stack mints (Google's tokens say https://accounts.google.com).
ISSUER = "upcfan-devstack"
# Google's OIDC tokens carry this issuer; the Cloud Tasks emulator mints with it, as Google does.
GOOGLE_ISSUER = "https://accounts.google.com"
ACCEPTED_ISSUERS = (ISSUER, GOOGLE_ISSUER)
# A person running the CLI, tests and scripts against the local stack. In Google Cloud that is an
# engineer's own account with project-level roles; locally it holds every permission (an owner).
OPERATOR_EMAIL = "operator@upcfan.localhost"
# What `gcloud auth print-identity-token` puts in `aud` (gcloud's own OAuth client): Cloud Run accepts
# such a token from a caller that may invoke the service ("Authenticating developers"), so the local
# operator's token carries it and every function's gate (devstack/gate.py) accepts it.
GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
ACCESS_TOKEN_TTL_S = 7 * 24 * 3600  # outlives any stack run: access tokens are minted once per `up`
ID_TOKEN_TTL_S = 3600  # Google's ID tokens last an hour


class TokenError(ValueError):
    """A token that cannot be read, is expired, or is for another audience (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    email: str
    audience: str = ""  # set on ID tokens (invocations), empty on access tokens (API calls)


def mint(email: str, audience: str = "", ttl_s: float = ACCESS_TOKEN_TTL_S, issuer: str = ISSUER,
         now: float | None = None) -> str:
    """An unsigned JWT naming `email` (an ID token when `audience` is given, else an access token)."""
    issued = int(time.time() if now is None else now)
    claims = {"iss": issuer, "sub": email, "email": email, "email_verified": True,
              "iat": issued, "exp": issued + int(ttl_s)}
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key=None, algorithm="none")


def claims(token: str, audiences: tuple[str, ...] = (), now: float | None = None) -> Principal:
    """The principal a token names; TokenError when it is malformed, expired, from an unknown issuer,
    or (with `audiences`) its `aud` is none of them. `audiences` empty: an access token (no `aud`)."""
    try:
        body = jwt.decode(token, options={"verify_signature": False, "verify_exp": False, "verify_aud": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}") from exc
    email = body.get("email")
    if not isinstance(email, str) or not email:
        raise TokenError("the token names no email")
    if body.get("iss") not in ACCEPTED_ISSUERS:
        raise TokenError(f"issuer {body.get('iss')!r} is not trusted")
    exp = body.get("exp")
    if not isinstance(exp, (int, float)) or exp <= (time.time() if now is None else now):
        raise TokenError("the token has expired")
    aud = body.get("aud", "")
    if audiences and aud not in audiences:
        raise TokenError(f"audience {aud!r} is not this service (expected one of {list(audiences)})")
    return Principal(email=email, audience=aud if isinstance(aud, str) else "")


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; TokenError without one."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("no bearer token")
    return token.strip()
