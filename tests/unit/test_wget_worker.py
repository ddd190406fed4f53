"""bench/wget_worker.py against a local HTTP server: the download is timed, then hashed, and
the spooled file is gone afterwards, also when the download fails."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("wget_worker", REPO / "bench" / "wget_worker.py")
assert spec is not None and spec.loader is not None
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

BODY = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "f.bin").write_bytes(BODY)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *_a: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget not installed (install.sh)")
def test_wget_fetch_hashes_after_the_download_and_cleans_the_spool(
    server: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    rec = worker.fetch(f"{server}/f.bin", 10.0, spool)
    assert rec["rc"] == 0 and rec["error"] == ""
    assert rec["bytes"] == len(BODY)
    assert rec["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert rec["t1"] >= rec["t0"]
    missing = worker.fetch(f"{server}/nope.bin", 10.0, spool)
    assert missing["rc"] == 8  # wget: the server answered with an error
    assert missing["sha256"] != hashlib.sha256(BODY).hexdigest()
    assert list(spool.iterdir()) == []


def test_python_fetch_hashes_the_body(server: str) -> None:
    rec = worker.fetch_python(f"{server}/f.bin", 10.0)
    assert rec["rc"] == 0
    assert rec["bytes"] == len(BODY)
    assert rec["sha256"] == hashlib.sha256(BODY).hexdigest()
