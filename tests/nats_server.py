"""A NATS server with JetStream for the fleet's tests: ``nats-server -js`` on loopback, a free port, its store in a
temporary folder; stopped (and restartable, same port and store) by the test.

Skipped, with the reason, where nats-server (Debian: apt-get install nats-server) or nats-py (pip install nats-py,
the [fleet] extra) is missing.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer(object):
    """``nats-server -js -a 127.0.0.1 -p PORT -sd STORE``; :meth:`start`, :meth:`stop` (SIGTERM, or ``kill`` -9),
    :attr:`url`. The store and port stay the same across restarts, like a broker restarted by systemd."""

    def __init__(self, store, log):
        self.binary = shutil.which("nats-server")
        self.store, self.log, self.port = str(store), str(log), free_port()
        self.url = "nats://127.0.0.1:{}".format(self.port)
        self.proc = None

    def start(self, timeout=20):
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                                          self.store], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:  # listening once a TCP connection succeeds
            assert self.proc.poll() is None, open(self.log).read()
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not listen within {} s".format(timeout)
                time.sleep(0.05)

    def stop(self, kill=False):
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def needs_nats():
    """Skip the test unless nats-server and nats-py are installed."""
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server): the fleet tests need a broker")
    pytest.importorskip("nats", reason="nats-py is not installed (pip install nats-py, the [fleet] extra)")


@pytest.fixture
def nats_server(tmp_path):
    """A running JetStream server for one test (stopped after it)."""
    needs_nats()
    store = tmp_path / "nats-store"
    os.makedirs(str(store))
    server = NatsServer(store, tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop(kill=True)
