"""The engine is transport-free: it imports no protobuf, and its FinishReason converts to chat.v1's by value."""

from __future__ import annotations

import subprocess
import sys

from chat.v1 import chat_pb2

from service.engine.request import FinishReason


def test_the_engine_imports_no_protobuf_types():
    code = ("import sys, service.engine.engine; "
            "print(sorted(m for m in sys.modules if m.startswith(('chat', 'google.protobuf', 'grpc'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_finish_reasons_equal_the_contracts():
    for reason in FinishReason:
        assert chat_pb2.FinishReason.Name(int(reason)) == f"FINISH_REASON_{reason.name}"
