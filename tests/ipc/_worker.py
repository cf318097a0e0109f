"""A stand-in gateway worker or launcher in a process of its own, driven by JSON lines.

    python -m tests.ipc._worker worker NAMESPACE GLOBAL_CAP|none
    python -m tests.ipc._worker launcher NAMESPACE GLOBAL_CAP|none

It prints ``{"ready": pid}`` once set up, then answers one JSON line per command line.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

from ipc.caps import apply_cap
from ipc.errors import CredentialGone
from ipc.gates import Gatekeeper, Permit
from ipc.ledger import Ledger
from ipc.namespace import NamespaceClaim


def reply(value: Any) -> None:
    print(json.dumps(value), flush=True)


def run_launcher(namespace: str, global_cap: int | None) -> None:
    with NamespaceClaim(namespace, global_cap=global_cap):
        reply({"ready": os.getpid()})
        for line in sys.stdin:
            if json.loads(line)["op"] == "exit":
                break
            reply(None)


def run_worker(namespace: str, global_cap: int | None) -> None:
    ledger = Ledger(namespace)
    gatekeeper = Gatekeeper(namespace, global_cap=global_cap, ledger=ledger)
    permits: list[Permit] = []
    reply({"ready": os.getpid()})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            if op == "admit":
                try:
                    gate = gatekeeper.credential_gate(
                        uuid.UUID(command["user"]), command["version"], command["cap"]
                    )
                except CredentialGone:
                    reply({"admitted": False, "gone": True})
                    continue
                result = gatekeeper.admit(gate)
                if isinstance(result, Permit):
                    permits.append(result)
                    reply({"admitted": True})
                else:
                    reply({"admitted": False, "scope": result.scope, "cap": result.cap})
            elif op == "release":
                reply(permits.pop(0).release())
            elif op == "apply":
                apply_cap(
                    namespace,
                    uuid.UUID(command["user"]),
                    version=command["version"],
                    cap=command["cap"],
                )
                reply(None)
            elif op == "held":
                reply(ledger.held())
            elif op == "generation":
                reply(gatekeeper.generation())
            elif op == "bump":
                gatekeeper.bump_generation()
                reply(None)
            elif op == "exit":
                break
            else:
                reply({"error": f"unknown op {op!r}"})
    finally:
        for permit in permits:
            permit.release()
        gatekeeper.close()
        ledger.close()


def main(argv: list[str]) -> None:
    role, namespace, cap = argv
    global_cap = None if cap == "none" else int(cap)
    if role == "launcher":
        run_launcher(namespace, global_cap)
    else:
        run_worker(namespace, global_cap)


if __name__ == "__main__":
    main(sys.argv[1:])
