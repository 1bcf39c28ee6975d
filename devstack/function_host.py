"""`python -m devstack.function_host`: one function as deploy runs it, behind Cloud Run's front end.

It does what the `functions-framework` command does (`create_app(target, source, "http")`, then
gunicorn through `functions_framework._http.create_server(app, debug=False)`, reading THREADS and
WORKERS from the env exactly as in Cloud Run), with one difference: the app's `wsgi_app` is wrapped
in `devstack.gate.InvokerGate`, the local stand-in for what Cloud Run checks before a request reaches
the container (ID token, audience, `run.invoker`) and for the request timeout. The function's code
and env are those of deploy; the gate's settings come on the command line from the infra model
(`devstack/stack.py`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m devstack.function_host", description=__doc__)
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--function", required=True, help="the service name (for the invoker check and logs)")
    p.add_argument("--service-url", required=True, help="the service URL: the ID token audience it accepts")
    p.add_argument("--custom-audience", action="append", default=[], help="a configured custom audience")
    p.add_argument("--invoker", action="append", default=[], help="an email holding run.invoker on it")
    p.add_argument("--timeout-s", type=float, default=0.0, help="the function's request timeout (0: none)")
    args = p.parse_args(argv)

    import functions_framework
    from functions_framework._http import create_server

    from devstack.gate import InvokerGate, ServicePolicy

    policy = ServicePolicy(args.function, args.service_url, frozenset(args.invoker), tuple(args.custom_audience))
    app = functions_framework.create_app(args.target, args.source, "http")
    app.wsgi_app = InvokerGate(app.wsgi_app, policy, timeout_s=args.timeout_s)
    create_server(app, False).run(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
