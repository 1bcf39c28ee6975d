"""What Cloud Run's front end does for a private service (`--no-allow-unauthenticated`), as WSGI middleware.

Every deployed function is private: Cloud Run checks the caller's ID token before the container sees
the request, and ends a request that outlives the service's timeout. Locally `devstack.function_host`
wraps each function's Flask app in `InvokerGate` (in process, so no extra hop):

- 401 when the request carries no bearer token, the token is malformed, expired or from an unknown
  issuer, or its `aud` is neither the service URL (exactly as `infra.model.Desired.function_url` gives
  it; a path such as `…/fanout` is another audience) nor a configured custom audience. Google's own
  samples name the audience with a trailing slash (`https://my-service.run.app/`), so that spelling is
  accepted too, and so is gcloud's audience (`identity.GCLOUD_AUDIENCE`: what `gcloud auth
  print-identity-token` gives an engineer, and the local operator's token carries).
- 403 when the token's email holds no `roles/run.invoker` on the service in the model
  (`infra.model.GRANTS`, targets `run:<function>`); the local operator may invoke everything (in
  Google Cloud an engineer's project roles include `run.routes.invoke`).
- The `Authorization` header reaches the function unchanged (Cloud Run passes it through), so the API
  reads the verified token's email as the audit actor. `X-Serverless-Authorization`, which Cloud Run
  checks instead when present, is honoured the same way.
- A request still running after the function's timeout (`infra.deploy.FunctionSpec.timeout_s`) is
  answered 504 and logged as an error; the code keeps running, as in Cloud Run.

References: Cloud Run "Authentication overview" and "Authenticating service-to-service"
(cloud.google.com/run/docs/authenticating/service-to-service), "Request timeout"
(cloud.google.com/run/docs/configuring/request-timeout).
"""

from __future__ import annotations

import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from devstack import identity

if TYPE_CHECKING:
    from infra.model import Desired

INVOKER_ROLE = "roles/run.invoker"

_PAGE = ("<html><head><meta http-equiv=\"content-type\" content=\"text/html;charset=utf-8\">\n"
         "<title>{code} {title}</title>\n</head>\n<body text=#000000 bgcolor=#ffffff>\n"
         "<h1>Error: {title}</h1>\n<h2>{text}</h2>\n<h2></h2>\n</body></html>\n")


@dataclass(frozen=True)
class Denial:
    status: int  # 401 or 403
    reason: str  # for the log line, never in the answer (Cloud Run does not say why either)
    email: str = ""


@dataclass(frozen=True)
class ServicePolicy:
    """Who may invoke one service, and with which token audiences."""

    function: str
    service_url: str
    invokers: frozenset[str]
    custom_audiences: tuple[str, ...] = ()
    audiences: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        url = self.service_url.rstrip("/")
        object.__setattr__(self, "audiences", (url, url + "/", identity.GCLOUD_AUDIENCE, *self.custom_audiences))

    def check(self, authorization: str | None) -> identity.Principal | Denial:
        """The caller, or why Cloud Run would refuse it."""
        try:
            principal = identity.claims(identity.bearer(authorization), audiences=self.audiences)
        except identity.TokenError as exc:
            return Denial(401, str(exc))
        if principal.email not in self.invokers:
            return Denial(403, f"{principal.email} has no {INVOKER_ROLE} on service {self.function}", principal.email)
        return principal


def invokers_of(desired: Desired, function: str) -> frozenset[str]:
    """The emails the model lets invoke `function`: its `run.invoker` grants, plus the local operator."""
    from infra.model import GRANTS

    granted = {desired.sa_email(g.account) for g in GRANTS
               if g.role == INVOKER_ROLE and g.target == f"run:{function}"}
    return frozenset(granted | {identity.OPERATOR_EMAIL})


def policy_for(desired: Desired, function: str, custom_audiences: tuple[str, ...] = ()) -> ServicePolicy:
    return ServicePolicy(function, desired.function_url(function), invokers_of(desired, function), custom_audiences)


def _log(severity: str, event: str, **fields: Any) -> None:
    from shared.log import log_event

    log_event(event, severity=severity, logger="devstack.gate", **fields)


class InvokerGate:
    """WSGI middleware: the invoker check, then the app under the request timeout."""

    def __init__(self, app: Callable, policy: ServicePolicy, timeout_s: float = 0.0, pool_size: int | None = None,
                 log: Callable[..., None] = _log) -> None:
        self.app = app
        self.policy = policy
        self.timeout_s = timeout_s
        self.pool_size = pool_size or 2 * int(os.environ.get("THREADS") or (os.cpu_count() or 1) * 4)
        self.log = log
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        header = environ.get("HTTP_X_SERVERLESS_AUTHORIZATION") or environ.get("HTTP_AUTHORIZATION")
        verdict = self.policy.check(header)
        if isinstance(verdict, Denial):
            return self._deny(verdict, environ, start_response)
        if self.timeout_s <= 0:
            return self.app(environ, start_response)
        return self._run_with_deadline(environ, start_response)

    def _deny(self, denial: Denial, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        self.log("WARNING", "invocation_denied", function=self.policy.function, status=denial.status,
                 reason=denial.reason, email=denial.email, method=environ.get("REQUEST_METHOD"), path=path)
        if denial.status == 401:
            title, text = "Unauthorized", f"Your client does not have permission to the requested URL <code>{path}</code>."
            extra = [("WWW-Authenticate", 'Bearer error="invalid_token" '
                                          'error_description="The access token could not be verified"')]
        else:
            title, text = "Forbidden", f"Your client does not have permission to get URL <code>{path}</code> from this server."
            extra = []
        body = _PAGE.format(code=denial.status, title=title, text=text).encode()
        start_response(f"{denial.status} {title}", [("Content-Type", "text/html; charset=UTF-8"),
                                                     ("Content-Length", str(len(body))), *extra])
        return [body]

    # ---- request timeout -----------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        # One pool per process (gunicorn forks its workers after the app is built): its threads are
        # reused, so the function's per-thread state (e.g. HTTP sessions) lives as long as in gunicorn.
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="request")
                self._pool_pid = os.getpid()
            return self._pool

    def _run_with_deadline(self, environ: dict, start_response: Callable) -> list[bytes]:
        # The body is read here, so the connection's stream is never touched by a request that
        # outlived its answer.
        environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read())
        started = time.monotonic()
        future = self._executor().submit(_complete, self.app, environ)
        try:
            status, headers, body = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.log("ERROR", "request_timeout", function=self.policy.function, timeout_s=self.timeout_s,
                     method=environ.get("REQUEST_METHOD"), path=environ.get("PATH_INFO") or "/",
                     message=f"The request has been terminated because it has reached the maximum request "
                             f"timeout of {self.timeout_s:g}s; the code keeps running")
            future.add_done_callback(lambda f: self._late(f, environ, started))
            body = b"upstream request timeout"
            start_response("504 Gateway Timeout", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        start_response(status, headers)
        return [body]

    def _late(self, future, environ: dict, started: float) -> None:
        error = future.exception()
        self.log("WARNING", "request_finished_after_timeout", function=self.policy.function,
                 path=environ.get("PATH_INFO") or "/", ran_s=round(time.monotonic() - started, 3),
                 status=None if error else future.result()[0], error=repr(error) if error else None)


def _complete(app: Callable, environ: dict) -> tuple[str, list, bytes]:
    """Run a WSGI app to the end: (status, headers, whole body)."""
    answer: dict[str, Any] = {}
    written: list[bytes] = []

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers
        return written.append

    result = app(environ, start_response)
    try:
        written.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return answer["status"], answer["headers"], b"".join(written)
