"""The host agent's retry rules (twinvol.host.retry): which errors are a path's, when a
faulted request is re-sent, and in what order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from twinvol.host import retry
from twinvol.nbd.constants import Cmd, Err


@pytest.mark.parametrize("err", [Err.EIO, Err.ESHUTDOWN, Err.ENOMEM, 99, 12345])
def test_faults_of_the_node_are_the_paths(err: int) -> None:
    assert retry.path_fault(int(err))


@pytest.mark.parametrize("err", [Err.EPERM, Err.EINVAL, Err.ENOSPC, Err.EOVERFLOW,
                                 Err.ENOTSUP])
def test_errors_of_the_request_are_the_clients(err: int) -> None:
    assert not retry.path_fault(int(err))


def test_only_reads_and_hints_are_resent_before_the_path_drained() -> None:
    assert all(retry.resend_at_once(int(c)) for c in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS))
    assert not any(retry.resend_at_once(int(c))
                   for c in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.FLUSH))


def test_the_first_fault_is_always_resent_then_until_hold_timeout() -> None:
    assert not retry.give_up(None, 100.0, 0.0)  # even with hold_timeout 0
    assert not retry.give_up(100.0, 129.9, 30.0)
    assert retry.give_up(100.0, 130.0, 30.0)
    assert retry.give_up(100.0, 100.0, 0.0)


def test_fault_reason_names_the_node_and_its_message() -> None:
    assert retry.fault_reason("B", int(Err.EIO), "partner lost") == \
        "node B answered EIO: partner lost"
    assert retry.fault_reason("A", int(Err.ESHUTDOWN)) == "node A answered NBD_ESHUTDOWN"
    assert retry.fault_reason("A", 77) == "node A answered error 77"
    assert len(retry.fault_reason("A", 5, "x" * 5000)) < 400


@dataclass
class Op:
    seq: int


def test_parked_requests_come_back_per_path_in_client_order() -> None:
    parking: retry.Parking[Op] = retry.Parking()
    for seq in (5, 2, 9):
        parking.park("A", Op(seq))
    parking.park("B", Op(1))
    assert parking.count() == 4
    assert [op.seq for op in parking.release("A")] == [2, 5, 9]
    assert parking.release("A") == []
    assert [op.seq for op in parking.take_all()] == [1]
    assert parking.count() == 0
