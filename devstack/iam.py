"""The local IAM policy: who may call which API method on which resource, from the production model.

Google checks every API call against the IAM policy: the caller (the principal its credentials
name) needs each permission of the method (`infra.permissions.METHOD_PERMISSIONS`) through a role
(`ROLE_PERMISSIONS`) granted on the resource or on the project above it (IAM inheritance). The
local stack does the same with the grants deploy applies (`infra.model.GRANTS`) on the local
project's resources (`devstack.stack.local_desired`), so a grant the model lacks fails locally as
it would on the first deploy. The Cloud Tasks emulator and the GCS gate (`devstack/gcs_gate.py`)
enforce it; Firestore is not enforced (its emulator ignores credentials, and every function holds
`roles/datastore.user` on the project).

The local operator (`devstack.identity.OPERATOR_EMAIL`: the CLI, tests, scripts, bench, the stack's
own setup) holds every permission, as a project owner would.

Every checked call is counted per (principal, method, resource, decision) and written to a JSONL
file per process under the run dir (`call_log_files()`), rewritten at most once a second and at
once when a new kind of call appears: its size is bounded by the kinds of calls, not their number.
`python -m infra audit` reads them.

Test-only: `UPCFAN_IAM_DROP_GRANTS="account:role:target,..."` (each an `infra.model.Grant` as
`api:roles/cloudtasks.viewer:item_queues`) removes those grants from the policy of a component
started with it (`devstack.testing.restart_component(..., extra_env=...)`); the stack strips
`UPCFAN_*` variables from its components' environment, so a shell's value never reaches `up`.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from devstack import identity
from infra import model
from infra.permissions import METHOD_PERMISSIONS, ROLE_PERMISSIONS

DROP_GRANTS_ENV = "UPCFAN_IAM_DROP_GRANTS"
OPERATOR_ROLE = "roles/owner"  # what the local operator stands for
UNAUTHENTICATED = "<unauthenticated>"
CALL_LOG_GLOB = "iam-calls-*.jsonl"
_LOG_SEQ = itertools.count()
TOKEN_CACHE_TTL_S = 60.0  # a cached token is read again after this (it may have expired meanwhile)
TOKEN_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    role: str = ""  # the role(s) granting the method's permissions ("a+b"); "" when denied
    missing: tuple[str, ...] = ()  # the permissions no granted role holds (sorted)


def grant_key(g: model.Grant) -> str:
    return f"{g.account}:{g.role}:{g.target}"


def parse_dropped(spec: str, grants: tuple[model.Grant, ...] = model.GRANTS) -> tuple[model.Grant, ...]:
    """The grants `spec` ("account:role:target,...") names; ValueError for one the model lacks."""
    by_key = {grant_key(g): g for g in grants}
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item not in by_key:
            raise ValueError(f"{DROP_GRANTS_ENV}: {item!r} is not a grant of infra.model.GRANTS; "
                             f"known: {sorted(by_key)}")
        out.append(by_key[item])
    return tuple(out)


class Policy:
    """`check(email, method, resource)`: the model's grants, precomputed per (email, resource)."""

    def __init__(self, desired: model.Desired, grants: tuple[model.Grant, ...] = model.GRANTS,
                 operator: str = identity.OPERATOR_EMAIL, dropped: tuple[model.Grant, ...] = ()):
        self.desired = desired
        self.operator = operator
        self.dropped = tuple(grant_key(g) for g in dropped)
        kept = [g for g in grants if g not in dropped]
        self.project = f"projects/{desired.project}"
        self.accounts = {desired.sa_email(a): a for a in model.SA_IDS}
        # (email, resource) -> {permission: sorted roles granting it there}, project grants included.
        direct: dict[tuple[str, str], dict[str, set[str]]] = {}
        for g in kept:
            email = desired.sa_email(g.account)
            for resource in desired.target_resources(g.target):
                perms = direct.setdefault((email, resource), {})
                for p in ROLE_PERMISSIONS[g.role]:
                    perms.setdefault(p, set()).add(g.role)
        self._project_perms = {email: perms for (email, r), perms in direct.items() if r == self.project}
        self._perms: dict[tuple[str, str], dict[str, set[str]]] = {}
        for (email, resource), perms in direct.items():
            merged = {p: set(roles) for p, roles in self._project_perms.get(email, {}).items()}
            for p, roles in perms.items():
                merged.setdefault(p, set()).update(roles)
            self._perms[(email, resource)] = merged
        self._decisions: dict[tuple[str, str, str], Decision] = {}

    def check(self, email: str, method: str, resource: str) -> Decision:
        key = (email, method, resource)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = self._decide(email, method, resource)
        return decision

    def _decide(self, email: str, method: str, resource: str) -> Decision:
        needed = METHOD_PERMISSIONS.get(method)
        if needed is None:
            raise KeyError(f"unclassified method {method!r}: add it to infra/permissions.py METHOD_PERMISSIONS")
        if email == self.operator:
            return Decision(True, OPERATOR_ROLE)
        perms = self._perms.get((email, resource)) or self._project_perms.get(email, {})
        missing = tuple(sorted(p for p in needed if p not in perms))
        if missing:
            return Decision(False, "", missing)
        roles = sorted({min(perms[p]) for p in needed})
        return Decision(True, "+".join(roles))

    def account(self, email: str) -> str:
        """The model's account key of `email` ("ingest", ...), "operator", or "" for a stranger."""
        return "operator" if email == self.operator else self.accounts.get(email, "")


def local_policy(location: str, env: dict[str, str] | None = None) -> Policy:
    """The policy of the local stack's project (`devstack.stack.local_desired`), less the grants
    `UPCFAN_IAM_DROP_GRANTS` names (test-only)."""
    from devstack.stack import FUNCTIONS, local_desired

    env = os.environ if env is None else env
    # IAM does not depend on the functions' URLs: any ports do.
    desired = local_desired({name: 0 for name in FUNCTIONS}, location)
    return Policy(desired, dropped=parse_dropped(env.get(DROP_GRANTS_ENV, "")))


# ---------------------------------------------------------------- tokens


class TokenCache:
    """`identity.claims` per token string, remembered for a minute (the hot path reads one token
    thousands of times); errors are remembered too."""

    def __init__(self, ttl_s: float = TOKEN_CACHE_TTL_S, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, tuple[float, identity.Principal | identity.TokenError]] = {}
        self.parses = 0

    def principal(self, authorization: str | None) -> identity.Principal:
        """The caller an `Authorization` header names; TokenError (-> 401) without a valid token."""
        token = identity.bearer(authorization)
        now = self.clock()
        entry = self._entries.get(token)
        if entry is None or entry[0] < now:
            if len(self._entries) >= TOKEN_CACHE_MAX:
                self._entries.clear()
            self.parses += 1
            try:
                result: identity.Principal | identity.TokenError = identity.claims(token)
            except identity.TokenError as exc:
                result = exc
            entry = self._entries[token] = (now + self.ttl_s, result)
        if isinstance(entry[1], identity.TokenError):
            raise entry[1]
        return entry[1]


# ---------------------------------------------------------------- the call log


def call_log_files(run_dir: Path | None = None) -> list[Path]:
    from devstack import paths

    return sorted((run_dir or paths.RUN_DIR).glob(CALL_LOG_GLOB))


def clear_call_logs(run_dir: Path | None = None) -> None:
    for f in call_log_files(run_dir):
        f.unlink(missing_ok=True)


class CallLog:
    """Counts of checked calls, one JSONL line per (principal, method, resource, decision), in one
    file per process (`iam-calls-<component>-<pid>-<n>.jsonl`), rewritten atomically."""

    def __init__(self, run_dir: Path, component: str, policy: Policy | None = None,
                 flush_interval_s: float = 1.0, clock=time.time):
        self.path = Path(run_dir) / f"iam-calls-{component}-{os.getpid()}-{next(_LOG_SEQ)}.jsonl"
        self.component = component
        self.policy = policy
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._counts: dict[tuple, list] = {}
        self._flushed_at = 0.0
        self._dirty = False

    def record(self, email: str, method: str, resource: str, decision: Decision) -> None:
        key = (email, method, resource, decision.allowed, decision.role, decision.missing)
        now = self.clock()
        entry = self._counts.get(key)
        if entry is None:
            self._counts[key] = [1, now, now]
            self.flush()  # a new kind of call (e.g. the first denial) is on disk at once
            return
        entry[0] += 1
        entry[2] = now
        self._dirty = True
        if now - self._flushed_at >= self.flush_interval_s:
            self.flush()

    def lines(self) -> list[dict]:
        dropped = list(self.policy.dropped) if self.policy else []
        out = []
        for (email, method, resource, allowed, role, missing), (count, first, last) in self._counts.items():
            out.append({"component": self.component, "pid": os.getpid(), "principal": email,
                        "account": self.policy.account(email) if self.policy else "",
                        "method": method, "resource": resource, "allowed": allowed, "role": role,
                        "missing": list(missing), "count": count, "first": round(first, 3),
                        "last": round(last, 3), "dropped_grants": dropped})
        return out

    def flush(self) -> None:
        self._flushed_at = self.clock()
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in self.lines()))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._dirty or not self.path.exists():
            self.flush()


def read_call_log(run_dir: Path | None = None) -> list[dict]:
    """Every line of every component's call log (several processes: counts are per process)."""
    out = []
    for f in call_log_files(run_dir):
        for raw in f.read_text().splitlines():
            if raw.strip():
                out.append(json.loads(raw))
    return out


# ---------------------------------------------------------------- the enforcer


class Denied(Exception):
    """A call the policy refuses: `status` 401 (no valid token) or 403 (a permission is missing)."""

    def __init__(self, status: int, email: str, method: str, resource: str, permission: str, detail: str = ""):
        super().__init__(detail or f"{email or UNAUTHENTICATED} lacks {permission} on {resource}")
        self.status = status
        self.email = email
        self.method = method
        self.resource = resource
        self.permission = permission
        self.detail = detail


class Enforcer:
    """What an emulator or gate runs per API call: who is calling (cached), may they, and the log."""

    def __init__(self, policy: Policy, log: CallLog | None = None):
        self.policy = policy
        self.log = log
        self.tokens = TokenCache()

    def authorize(self, authorization: str | None, checks: list[tuple[str, str]]) -> str:
        """The caller's email when every (method, resource) of `checks` is allowed; else Denied
        for the first refused one (in order, as the service checks them)."""
        try:
            email = self.tokens.principal(authorization).email
        except identity.TokenError as exc:
            method, resource = checks[0]
            permission = sorted(METHOD_PERMISSIONS[method])[0]
            if self.log:
                self.log.record(UNAUTHENTICATED, method, resource, Decision(False, "", (permission,)))
            raise Denied(401, "", method, resource, permission, str(exc)) from None
        for method, resource in checks:
            decision = self.policy.check(email, method, resource)
            if self.log:
                self.log.record(email, method, resource, decision)
            if not decision.allowed:
                raise Denied(403, email, method, resource, decision.missing[0])
        return email

    def close(self) -> None:
        if self.log:
            self.log.close()
