"""hierarchy/rpc/ is what scripts/generate_protos.py makes of protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_generated_code_is_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_protos.py"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_proto_package_is_versioned() -> None:
    from hierarchy.rpc import control_pb2

    assert control_pb2.DESCRIPTOR.package == "pacsnode.control.v1"
    assert control_pb2.DESCRIPTOR.name == "pacsnode/control/v1/control.proto"
