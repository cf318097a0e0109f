"""Names of a namespace's semaphores and ledgers: POSIX limits, validation, parsing."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ipc import ledger as ledger_module
from ipc.errors import InvalidName
from ipc.naming import (
    NAMESPACE_MAX,
    POSIX_NAME_MAX,
    GateName,
    cap_record_name,
    credential_debt_name,
    credential_gate_name,
    generation_name,
    global_gate_name,
    ledger_name,
    parse_gate_name,
    validate_namespace,
)

namespaces = st.text(
    alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=NAMESPACE_MAX
)
caps = st.integers(min_value=1, max_value=256)
pids = st.integers(min_value=1, max_value=2**22)  # the kernel's largest pid_max

LONGEST_NAMESPACE = "n" * NAMESPACE_MAX


def assert_posix_name(name: str, namespace: str) -> None:
    assert name.startswith(f"/{namespace}.")
    assert len(name) - 1 <= POSIX_NAME_MAX
    assert "/" not in name[1:]
    assert "\0" not in name


@given(namespace=namespaces, user_id=st.uuids(), cap=caps, pid=pids)
@example(namespace=LONGEST_NAMESPACE, user_id=uuid.UUID(int=2**128 - 1), cap=256, pid=2**22)
def test_every_name_fits_posix_limits(
    namespace: str, user_id: uuid.UUID, cap: int, pid: int
) -> None:
    validate_namespace(namespace)
    gates = [global_gate_name(namespace, cap), credential_gate_name(namespace, user_id)]
    others = [
        generation_name(namespace),
        ledger_name(namespace, pid),
        credential_debt_name(namespace, user_id),
        cap_record_name(namespace, user_id),
    ]
    for name in gates + others:
        assert_posix_name(name, namespace)
    # A gate's name is written into a fixed slot of the worker's ledger.
    for name in gates:
        assert len(name.encode()) <= ledger_module._NAME_BYTES


@given(user_id=st.uuids())
def test_a_credential_is_named_by_its_user_alone(user_id: uuid.UUID) -> None:
    """Never by its cap: a cap change resizes the one semaphore every holder releases onto."""
    names = {
        credential_gate_name("ns", user_id),
        credential_debt_name("ns", user_id),
        cap_record_name("ns", user_id),
    }
    assert len(names) == 3
    assert all(name.endswith(user_id.hex) for name in names)


@pytest.mark.parametrize("namespace", ["", "a/b", "n" * (NAMESPACE_MAX + 1), "a.b", "a b", "é"])
def test_validate_namespace_rejects(namespace: str) -> None:
    with pytest.raises(InvalidName):
        validate_namespace(namespace)


@pytest.mark.parametrize("namespace", ["a", LONGEST_NAMESPACE, "Gw_prod-2"])
def test_validate_namespace_accepts(namespace: str) -> None:
    assert validate_namespace(namespace) == namespace


@pytest.mark.parametrize("namespace", ["abc\n", LONGEST_NAMESPACE + "\n"])
def test_validate_namespace_rejects_trailing_newline(namespace: str) -> None:
    with pytest.raises(InvalidName):
        validate_namespace(namespace)


@given(namespace=namespaces, cap=caps)
def test_parse_global_gate_name_round_trips(namespace: str, cap: int) -> None:
    name = global_gate_name(namespace, cap)
    assert parse_gate_name(name) == GateName(name=name, scope="global", cap=cap)


@given(namespace=namespaces, user_id=st.uuids())
def test_parse_credential_gate_name_round_trips(namespace: str, user_id: uuid.UUID) -> None:
    name = credential_gate_name(namespace, user_id)
    assert parse_gate_name(name) == GateName(name=name, scope="credential", user_id=user_id)
    assert parse_gate_name(credential_debt_name(namespace, user_id)) is None


@given(namespace=namespaces, pid=pids)
def test_parse_gate_name_is_none_for_counter_and_ledger(namespace: str, pid: int) -> None:
    assert parse_gate_name(generation_name(namespace)) is None
    assert parse_gate_name(ledger_name(namespace, pid)) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "/ns",
        "/ns.g",
        "/ns.g.x",
        "/ns.g.1.2",
        "/ns.x.1",
        "/ns.c.nothex.1.2",
        "/ns.c.nothex",
        f"/ns.c.{uuid.UUID(int=1).hex}.1.2",
        f"/ns.c.{uuid.UUID(int=1).hex}.1",
        f"/ns.c.{uuid.UUID(int=1).hex[:-1]}",
        f"/ns.g.{uuid.UUID(int=1).hex}.1.2",
    ],
)
def test_parse_gate_name_is_none_for_other_names(name: str) -> None:
    assert parse_gate_name(name) is None
