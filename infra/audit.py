"""`python -m infra audit`: what the functions really called in the local stack, against the model.

Reads the local stack's IAM call log (`devstack/iam.py`: counts per principal, method, resource and
decision, written by the Cloud Tasks emulator and the GCS gate), prints per service account the
methods seen with their resources, counts and the role that granted each, and reports as findings:

- any denied call (a function, or anything else, refused by the local policy);
- any call a function made that the model (`infra.model.GRANTS`) does not grant;
- any method a function called that `infra.permissions.FUNCTION_CALLS` does not list for it (the
  static table the docs and `gaps()` are built from is then incomplete).

Calls denied by a component started with grants dropped on purpose (`UPCFAN_IAM_DROP_GRANTS`, the
tests that prove a missing grant fails) are listed apart and are not findings, as are denials a
library tolerates (`infra.permissions.TOLERATED_DENIALS`, e.g. google-cloud-storage's background
bucket metadata read).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from infra import model
from infra.permissions import FUNCTION_CALLS, TOLERATED_DENIALS


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    expected_denials: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)


def _merge(entries: list[dict]) -> dict[tuple, dict]:
    """Entries of every process summed per (principal, method, resource, allowed, role, dropped)."""
    out: dict[tuple, dict] = {}
    for e in entries:
        key = (e["principal"], e.get("account", ""), e["method"], e["resource"], e["allowed"], e.get("role", ""),
               tuple(e.get("missing", ())), tuple(e.get("dropped_grants", ())))
        if key in out:
            out[key]["count"] += e.get("count", 1)
        else:
            out[key] = {"count": e.get("count", 1), "components": set()}
        out[key]["components"].add(e.get("component", "?"))
    return out


def audit(entries: list[dict], policy) -> Report:
    """`policy`: the model's policy of the audited project (`devstack.iam.Policy`, no grant dropped)."""
    report = Report()
    merged = _merge(entries)
    by_principal: dict[tuple[str, str], list] = defaultdict(list)
    for key, value in merged.items():
        by_principal[(key[1] or "?", key[0])].append((key, value))
    for (account, principal), rows in sorted(by_principal.items()):
        report.lines.append(f"{account} ({principal})")
        for (_, _, method, resource, allowed, role, missing, dropped), value in sorted(rows, key=lambda r: r[0][2:4]):
            verdict = f"granted by {role}" if allowed else f"DENIED (missing {', '.join(missing)})"
            report.lines.append(f"  {method:<30} {resource}  x{value['count']}  {verdict}")
            where = f"{account} ({principal}): {method} on {resource} x{value['count']}"
            if not allowed:
                if method in TOLERATED_DENIALS:
                    report.tolerated.append(f"{where}: {TOLERATED_DENIALS[method]}")
                elif dropped:
                    report.expected_denials.append(f"{where}: denied with grants dropped for a test ({', '.join(dropped)})")
                else:
                    report.findings.append(f"denied: {where} (missing {', '.join(missing)})")
                continue
            if account in model.FUNCTIONS:
                model_decision = policy.check(principal, method, resource)
                if not model_decision.allowed:
                    report.findings.append(f"not granted by the model: {where} (missing "
                                           f"{', '.join(model_decision.missing)})")
                listed = {c.method for c in FUNCTION_CALLS.get(account, ())}
                if method not in listed:
                    report.findings.append(f"not in infra.permissions.FUNCTION_CALLS[{account!r}]: {where} "
                                           f"(listed: {sorted(listed)})")
    return report


def render(report: Report, source: str) -> str:
    out = [f"IAM call log: {source}", "", *report.lines, ""]
    if report.expected_denials:
        out += ["denied on purpose (a test dropped these grants):", *(f"  {d}" for d in report.expected_denials), ""]
    if report.tolerated:
        out += ["denied and tolerated by the caller (infra.permissions.TOLERATED_DENIALS):",
                *(f"  {d}" for d in report.tolerated), ""]
    if report.findings:
        out += [f"{len(report.findings)} finding(s):", *(f"  {f}" for f in report.findings)]
    else:
        out.append("no findings: every call was allowed by the model and is listed in FUNCTION_CALLS")
    return "\n".join(out)
