"""The client ships generated stubs that are fresh, and installs without the server's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path):
    import importlib.resources

    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / "proto/chat/v1/chat.proto")]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "chat/v1" / name).read_text()
        checked_in = (ROOT / "gen/chat/v1" / name).read_text()
        assert fresh == checked_in, f"gen/chat/v1/{name} is stale: run `make proto`"


def test_client_imports_without_torch_or_transformers():
    code = ("import sys, client.chat_client, client.cli, chat.v1.chat_pb2_grpc; "
            "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_base_install_has_no_heavy_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "torch" not in base and "transformers" not in base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["server"])
    assert project["scripts"] == {"chat-server": "service.main:main", "chat-client": "client.cli:main",
                                  "chat-web": "client.web.launch:main"}
    assert not any(d.startswith("streamlit") for d in project["dependencies"])  # the page is the `web` extra
