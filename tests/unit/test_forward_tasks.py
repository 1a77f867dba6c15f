"""When the forwarder opens another association to a device (service.may_start_task)."""

from __future__ import annotations

import pytest

from node.forwarding.service import may_start_task


@pytest.mark.parametrize(("busy", "limit", "waiting", "expected"), [
    (0, 2, 1, True),  # the first task: whatever waits
    (0, None, 1, True),  # limit not read yet: read it
    (1, 2, 1, False),  # a trickle: the running task takes it next
    (1, 2, 49, False),
    (1, 2, 50, True),  # a batch's worth waits behind it: a second association
    (1, None, 50, True),
    (2, 2, 500, False),  # at the device's limit
    (1, 1, 500, False),
])
def test_a_second_association_only_for_a_backlog_and_never_over_the_limit(
        busy: int, limit: int | None, waiting: int, expected: bool) -> None:
    assert may_start_task(busy, limit, waiting, batch_size=50) is expected
