"""l4lb.control: the protocol, refusals that change nothing, and a server that never blocks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from l4lb.control import (
    MAX_LINE,
    Command,
    CommandError,
    ControlServer,
    ControlUnavailable,
    RequestRefused,
    arg_int,
    arg_str,
    main,
    request,
    requests,
)
from l4lb.errors import L4lbError


class Store:
    """A tiny handler set: a value that `set` changes only when its argument is valid."""

    def __init__(self) -> None:
        self.value = 1

    def commands(self) -> dict[str, Command]:
        return {
            "show": Command(lambda req: {"value": self.value}, "the value"),
            "set": Command(self.set, "set the value (0..10)"),
        }

    def set(self, req: Mapping[str, Any]) -> int:
        value = arg_int(req, "value", 0, 10)
        arg_str(req, "who")
        self.value = value
        return value


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlServer, Store, Path]]:
    """A server on a socket of its own, serviced by a thread as a packet loop would."""
    store = Store()
    path = tmp_path / "x.ctl"
    server = ControlServer(path, store.commands())
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.service()
            time.sleep(0.001)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield server, store, path
    stop.set()
    t.join(2)
    server.close()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{", "request is not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"x": 1}', "no string 'cmd'"),
        (b'{"cmd": 3}', "no string 'cmd'"),
        (b'{"cmd": "nope"}', "unknown command 'nope' .commands: show, set, help."),
        (b'{"cmd": "set", "value": 11, "who": "me"}', "set: argument 'value' must be an integer"),
        (b'{"cmd": "set", "value": true, "who": "me"}', "must be an integer 0..10, not True"),
        (b'{"cmd": "set", "value": 5}', "set: argument 'who' must be a non-empty string"),
    ],
)
def test_bad_requests_get_an_error_and_change_nothing(tmp_path, line, error):
    store = Store()
    server = ControlServer(tmp_path / "s.ctl", store.commands())
    try:
        reply = server.handle(line)
        assert reply["ok"] is False
        assert __import__("re").search(error, reply["error"]), reply["error"]
        assert store.value == 1
        assert server.refused == 1 and server.requests == 1
    finally:
        server.close()


def test_requests_and_replies_in_order_on_one_connection(served):
    _, store, path = served
    assert request(path, "show") == {"value": 1}
    results = requests(path, [{"cmd": "set", "value": 7, "who": "t"}, {"cmd": "show"}])
    assert results == [7, {"value": 7}]
    assert store.value == 7
    with pytest.raises(
        RequestRefused, match=r"argument 'value' must be an integer 0\.\.10, not 99"
    ):
        request(path, "set", value=99, who="t")
    assert store.value == 7
    helps = request(path, "help")
    assert helps == {
        "help": "list the commands",
        "set": "set the value (0..10)",
        "show": "the value",
    }


def test_a_line_in_pieces_and_a_line_too_long(served):
    _, _, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(b'{"cmd": ')
        time.sleep(0.05)
        s.sendall(b'"show"}\n')
        assert json.loads(s.makefile().readline()) == {"ok": True, "result": {"value": 1}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        # The server may close before it read everything; its reply is still there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (MAX_LINE + 10))
        reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and "longer than" in reply["error"]


def test_a_silent_client_does_not_block_the_loop(tmp_path):
    server = ControlServer(tmp_path / "q.ctl", Store().commands())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(tmp_path / "q.ctl"))
            s.sendall(b'{"cmd": "sh')  # half a request, then nothing
            t0 = time.monotonic()
            for _ in range(100):
                server.service()
            assert time.monotonic() - t0 < 0.5  # 100 calls, none waited for the client
            assert len(server.clients) == 1
        server.service()  # the client closed: its half line is dropped with it
        assert server.clients == {}
    finally:
        server.close()


def test_socket_file_is_root_only_and_stale_files_are_replaced(tmp_path):
    path = tmp_path / "r.ctl"
    server = ControlServer(path, Store().commands())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(L4lbError, match="another process already serves it"):
        ControlServer(path, Store().commands())
    server.listener.close()  # as if the process died: the file stays, nobody listens
    again = ControlServer(path, Store().commands())
    again.close()
    assert not path.exists()


def test_nobody_listening_is_unavailable_with_the_reason(tmp_path):
    with pytest.raises(ControlUnavailable, match="no control socket"):
        request(tmp_path / "none.ctl", "show")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a caller as another user")
def test_a_non_root_caller_is_refused_even_when_the_file_mode_allows_it():
    store = Store()
    where = Path(tempfile.mkdtemp(prefix="l4lb-ctl-", dir="/tmp"))  # nobody may enter it
    try:
        os.chmod(where, 0o755)
        path = where / "n.ctl"
        server = ControlServer(path, store.commands())
        os.chmod(path, 0o666)  # the peer-credential check must hold on its own
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody, ask to change the value
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    request(path, "set", value=5, who="nobody", timeout=5)
                    out = "applied"
                except (RequestRefused, ControlUnavailable) as exc:
                    out = str(exc)
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            server.service()
            time.sleep(0.001)
        with os.fdopen(r) as f:
            said = f.read()
        assert "permission denied: the control channel is for root only, not uid 65534" in said
        assert store.value == 1
        assert server.refused == 1
        server.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_command_line_prints_the_result_or_the_refusal(served, capsys):
    _, store, path = served
    assert main([str(path), "set", "value=3", "who=cli"]) == 0
    assert json.loads(capsys.readouterr().out) == 3
    assert main([str(path), "set", "value=30", "who=cli"]) == 1
    assert "must be an integer 0..10, not 30" in capsys.readouterr().err
    assert store.value == 3


def test_command_errors_are_l4lb_errors():
    assert issubclass(CommandError, L4lbError)
