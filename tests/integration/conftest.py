"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom.association import Association

from tests.conftest import RunningNode
from tests.integration.test_bad_input import echo_ok
from tests.scu import associate


@pytest.fixture
def bystander(node: RunningNode) -> Iterator[Association]:
    """An association opened before a hostile one; it must keep working."""
    assoc = associate(node.port, calling="BYSTANDER")
    assert assoc.is_established
    yield assoc
    assert int(assoc.send_c_echo().Status) == 0, "the other association was disturbed"
    assoc.release()
    assert echo_ok(node)
