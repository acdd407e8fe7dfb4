"""Harness of the gated tests that run the pack inside a real ComfyUI.

Skipped unless `COMFYUI_DIR` names a ComfyUI checkout (CI never sets it). `COMFYUI_PYTHON` is the Python that runs
it (default `$COMFYUI_DIR/.venv/bin/python`). The `comfyui` fixture starts one server for the session on a free
loopback port, with a temporary `--base-directory` whose `custom_nodes/` links to this pack and whose `models/`
folders the tests fill; it yields a `ComfyUIClient`.

`ComfyUIClient.events(client_id)` reads the `/ws` messages a prompt queued with that client id gets (progress,
executing, ...); it speaks just enough of the websocket protocol for that, so the tests need no websocket package.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "flux-lora-trainer"  # the link's name: ComfyUI's module name, served under /extensions/<name>/
MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras")
START_TIMEOUT_S = 180  # importing torch and ComfyUI's nodes takes ~30 s on an idle 2-core machine
LOG_TAIL_CHARS = 6000


class ComfyUIClient:
    """A ComfyUI server on 127.0.0.1, spoken to over its HTTP API."""

    pack_name = PACK_NAME  # the pack's folder in custom_nodes/: its python_module is "custom_nodes.<pack_name>"

    def __init__(self, url: str, base_dir: Path, log_path: Path, process: subprocess.Popen):
        self.url = url
        self.base_dir = base_dir
        self.log_path = log_path
        self.process = process
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

    @staticmethod
    def pack_tracebacks(log: str) -> list[str]:
        """The tracebacks in `log` that pass through this pack (ComfyUI's own, e.g. its database's, are not ours)."""
        chunks = log.split("Traceback (most recent call last):")[1:]
        return [c for c in chunks if "trainer_core" in c or "custom_nodes" in c]

    def models_dir(self, folder: str) -> Path:
        """`models/<folder>` of the base directory, e.g. "loras"; files put there show up in the node pickers."""
        return self.base_dir / "models" / folder

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log()[-LOG_TAIL_CHARS:]

    def get(self, path: str, timeout: float = 30) -> Any:
        """The JSON a GET of `path` answers, e.g. "/system_stats" or "/models/loras"."""
        return json.loads(self.get_bytes(path, timeout))

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with self._http.open(self.url + path, timeout=timeout) as response:
            return response.read()

    def post(self, path: str, body: dict, timeout: float = 30) -> Any:
        """POST `body` as JSON; returns the JSON answer (None when the answer is empty)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with self._http.open(request, timeout=timeout) as response:
            data = response.read()
        return json.loads(data) if data else None

    def object_info(self) -> dict:
        """Every node class the server knows, with its inputs and outputs."""
        return self.get("/object_info")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id. A prompt the server rejects raises with its errors."""
        body = {"prompt": prompt} | ({"client_id": client_id} if client_id else {})
        try:
            return self.post("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"ComfyUI rejected the prompt: {e.read().decode(errors='replace')}") from e

    def interrupt(self, prompt_id: str) -> None:
        """What the Cancel button does: stop `prompt_id` if it is the one running."""
        self.post("/interrupt", {"prompt_id": prompt_id})

    def view(self, image: dict) -> bytes:
        """The file of one `{"filename", "subfolder", "type"}` entry of a history output's "images"."""
        return self.get_bytes("/view?" + urlencode({k: image[k] for k in ("filename", "subfolder", "type")}))

    def events(self, client_id: str, timeout: float = 60) -> "EventStream":
        """The websocket messages for prompts queued with `client_id`; open it before queueing."""
        return EventStream(self.url, client_id, timeout)

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll `/history/<prompt_id>` until the prompt has run; returns its history entry.

        The entry holds "status" ({"status_str": "success" | "error", "completed", "messages"}) and "outputs"
        (the UI outputs per node id). Raises TimeoutError, or RuntimeError if the server died, with the log tail.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; server log:\n{self.log_tail()}")


class EventStream:
    """ComfyUI's `/ws` for one client id, as {"type", "data"} messages. A context manager.

    Server frames are unmasked and ComfyUI sends each message in one frame; binary frames (image previews) are
    skipped. A read that waits longer than `timeout` raises TimeoutError.
    """

    def __init__(self, url: str, client_id: str, timeout: float):
        address = urlsplit(url)
        self._socket = socket.create_connection((address.hostname, address.port), timeout=timeout)
        self._file = self._socket.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self._socket.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {address.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        status = self._file.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"ComfyUI refused the websocket: {status!r}")
        while self._file.readline() not in (b"\r\n", b""):  # the rest of the handshake's headers
            pass

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) < n:
            raise ConnectionError("ComfyUI closed the websocket")
        return data

    def next(self) -> dict:
        """The next JSON message."""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(self._read(2 if size == 126 else 8), "big")
            opcode, payload = first & 0x0F, self._read(size)
            if opcode == 1:
                return json.loads(payload)
            if opcode == 8:
                raise ConnectionError("ComfyUI closed the websocket")

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *_) -> None:
        self._file.close()
        self._socket.close()


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_directory(root: Path) -> Path:
    """ComfyUI's --base-directory: custom_nodes/<pack> links here; models/, input/, output/ start empty."""
    for folder in ("custom_nodes", "input", "output", *(f"models/{m}" for m in MODEL_FOLDERS)):
        (root / folder).mkdir(parents=True)
    (root / "custom_nodes" / PACK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI checkout named by COMFYUI_DIR; skips the test when it is unset."""
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("COMFYUI_DIR is unset: set it to a ComfyUI checkout to run the in-ComfyUI tests")
    folder = Path(value).expanduser().resolve()
    if not (folder / "main.py").is_file() or not (folder / "comfy").is_dir():
        pytest.fail(f"COMFYUI_DIR={value} is not a ComfyUI checkout (no main.py and comfy/ there); fix the variable")
    return folder


@pytest.fixture(scope="session")
def comfyui_python(comfyui_dir: Path) -> Path:
    """The Python with ComfyUI's requirements: COMFYUI_PYTHON, or the checkout's .venv."""
    python = Path(os.environ.get("COMFYUI_PYTHON") or comfyui_dir / ".venv" / "bin" / "python")
    if not python.is_file():
        pytest.fail(f"no Python at {python}; set COMFYUI_PYTHON to the interpreter ComfyUI's requirements are in")
    return python


def start_comfyui(comfyui_dir: Path, comfyui_python: Path, base_dir: Path) -> ComfyUIClient:
    """A ComfyUI server on the CPU over `base_dir` (from `_base_directory`), up and answering; stop it with
    `stop_comfyui`. Its log is appended to `base_dir/server.log`, so a restarted server keeps one log."""
    log_path = base_dir / "server.log"
    port = _free_loopback_port()
    command = [
        str(comfyui_python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base_dir),
        "--database-url", "sqlite:///:memory:",  # else it writes to the checkout's user/comfyui.db
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
    client = ComfyUIClient(f"http://127.0.0.1:{port}", base_dir, log_path, process)
    try:
        _wait_until_up(client)
    except BaseException:
        stop_comfyui(client)
        raise
    return client


def stop_comfyui(client: ComfyUIClient) -> None:
    client.process.terminate()
    try:
        client.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        client.process.kill()
        client.process.wait()


@pytest.fixture(scope="session")
def comfyui(comfyui_dir: Path, comfyui_python: Path, tmp_path_factory) -> Iterator[ComfyUIClient]:
    """A ComfyUI server for the session, on the CPU, loading this pack from a temporary base directory."""
    client = start_comfyui(comfyui_dir, comfyui_python, _base_directory(tmp_path_factory.mktemp("comfyui_base")))
    try:
        yield client
    finally:
        stop_comfyui(client)


def _wait_until_up(client: ComfyUIClient) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if client.process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {client.process.returncode} while starting:\n{client.log_tail()}")
        try:
            client.get("/system_stats", timeout=5)
            return
        except OSError:  # refused, reset or timed out while the server starts
            time.sleep(1)
    pytest.fail(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S} s:\n{client.log_tail()}")
