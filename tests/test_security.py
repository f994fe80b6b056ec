"""Credentials: `latentlink keys`, TLS (--tls) and the token handshake (--token-file).

End to end, edge and host processes as the user runs them: the right credentials stream every frame; each wrong or
missing credential is refused with a reason named on both sides (the edge's stderr, exit status 1; the host's log),
and the host goes on serving a good edge afterwards. In one process: the protocol's CHALLENGE and AUTH messages, the
proofs (a replayed AUTH fails), token files, the key files, the host's TLS handshake deadline, and the socket
wrapper that lets the edge's two threads share one TLS connection.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import ssl
import stat
import threading
import time

import pytest

from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.protocol import (KIND_ACCEPT, KIND_AUTH, KIND_CHALLENGE, KIND_HELLO, KIND_NAMES, KIND_REFUSE,
                                      PERMANENT_REFUSALS, VERSION_2, encode_message, parse_fields, read_body,
                                      read_header)
from latentlink.edge.security import (Credentials, TLSSocket, client_context, connect_tls, edge_proof, host_proof,
                                      new_nonce, proof_matches, read_token, server_context)

from latentlink import keys

from .conftest import run_cli, running_host
from .test_end_to_end import start_host

FRAMES = 6


class Keys(object):
    """Credentials made by `latentlink keys`, as a user would make them."""

    def __init__(self, root):
        self.root = root
        self.ca = str(root / "site")  # the host's CA, with edges cam0 and cam1
        self.other = str(root / "other")  # a second `keys init`: another CA, with its own cam0
        self.elsewhere = str(root / "elsewhere")  # a CA whose host certificate names only example.invalid
        self.squat = str(root / "squat")  # cam1's certificate and key filed as cam0's (an edge posing as cam0)
        self.token = str(root / "token.txt")
        self.wrong_token = str(root / "wrong-token.txt")


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    pytest.importorskip("cryptography")
    k = Keys(tmp_path_factory.mktemp("keys"))
    for args in (["init", k.ca], ["edge", k.ca, "cam0"], ["edge", k.ca, "cam1"], ["init", k.other],
                 ["edge", k.other, "cam0"], ["init", k.elsewhere, "--host-name", "example.invalid"],
                 ["edge", k.elsewhere, "cam0"], ["token", k.token], ["token", k.wrong_token]):
        assert keys.main(args) == 0, args
    os.makedirs(os.path.join(k.squat, "edges"))
    shutil.copy(os.path.join(k.ca, "ca.pem"), k.squat)
    for ext in (".pem", ".key"):
        shutil.copy(os.path.join(k.ca, "edges", "cam1" + ext), os.path.join(k.squat, "edges", "cam0" + ext))
    return k


def edge(address, profile, tmp_path, name, *args, frames=FRAMES):
    """An edge process streaming ``frames`` synthetic frames as ``name``; returns (process, report or None)."""
    report = tmp_path / "edge-{}.json".format(time.monotonic_ns())
    proc = run_cli("latentlink.edge", "--source", "synthetic://", "--frames", str(frames), "--connect", address,
                   "--name", name, "--profile", profile, "--drop", "block", "--report", str(report), *args)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def assert_refused(proc, *words):
    """The edge stopped with exit status 1 and an error line naming the reason."""
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error, proc.stderr
    for word in words:
        assert word in error[-1], error[-1]


def assert_streamed(proc, report, frames=FRAMES):
    assert proc.returncode == 0, proc.stderr
    assert report["outcomes"]["decoded"] == frames and report["outcomes"]["lost"] == 0


def finish(host):
    out, _ = host.communicate(timeout=60)
    assert host.returncode == 0, out
    return out


def saved(tmp_path, name):
    folder = tmp_path / "frames" / name
    return sorted(os.listdir(str(folder))) if folder.exists() else []


# --- end to end: TLS ------------------------------------------------------------------------------------------------
def test_tls_host_refuses_wrong_certificates_and_serves_the_right_one(tmp_path, tiny_profile, creds):
    host, address = start_host(tmp_path, tiny_profile, "--tls", creds.ca)
    # (edge options, words in the edge's error, words in the host's log)
    cases = [
        # a second `keys init`: the edge trusts another CA, so it refuses the host first
        (["--tls", creds.other], ["(tls)", "does not vouch for"], ["the edge rejected this host's certificate"]),
        # a certificate from another CA, the host's ca.pem: the host refuses the edge
        (["--tls", creds.other, "--tls-ca", os.path.join(creds.ca, "ca.pem")],
         ["(tls)", "the host does not trust this edge's certificate"],
         ["the edge's certificate is not signed by this host's CA"]),
        # no TLS at all
        ([], ["(unauthorized)", "this host requires TLS"], ["an edge without TLS"]),
        # squatting: cam1's valid certificate, asking for cam0
        (["--tls", creds.squat], ["(unauthorized)", "the certificate is for 'cam1', not 'cam0'"],
         ["refused stream 'cam0' (unauthorized): the certificate is for 'cam1', not 'cam0'"]),
    ]
    for args, edge_words, _ in cases:
        proc, report = edge(address, tiny_profile, tmp_path, "cam0", *args)
        assert_refused(proc, *edge_words)
        assert report["outcomes"]["decoded"] == 0
    assert host.poll() is None  # still serving
    proc, report = edge(address, tiny_profile, tmp_path, "cam0", "--tls", creds.ca)
    assert_streamed(proc, report)
    log = finish(host)
    for _, _, host_words in cases:
        for word in host_words:
            assert word in log, log
    assert saved(tmp_path, "cam0") == ["{:06d}.png".format(i) for i in range(FRAMES)]


def test_tls_edge_checks_the_host_name(tmp_path, tiny_profile, creds):
    """The host's certificate names example.invalid only; the edge connects to 127.0.0.1."""
    host, address = start_host(tmp_path, tiny_profile, "--tls", creds.elsewhere)
    proc, _ = edge(address, tiny_profile, tmp_path, "cam0", "--tls", creds.elsewhere)
    assert_refused(proc, "(tls)", "not valid for '127.0.0.1'", "--host-name 127.0.0.1")
    host.terminate()
    assert "the edge rejected this host's certificate" in host.communicate(timeout=60)[0]


def test_protocol_1_edge_under_tls_streams_only_its_certificate_name(tmp_path, tiny_profile, creds):
    host, address = start_host(tmp_path, tiny_profile, "--tls", creds.ca)
    # Protocol 1 has no REFUSE and no acknowledgements: the host closes the squatter's connection at its first
    # frame, before reading its payload, and the edge, which counts frames written to the socket as "sent", cannot
    # know. The host's log says why; nothing is written.
    edge(address, tiny_profile, tmp_path, "cam0", "--tls", creds.squat, "--protocol", "1", "--drop", "oldest",
         frames=2)
    assert saved(tmp_path, "cam0") == []
    proc, report = edge(address, tiny_profile, tmp_path, "cam0", "--tls", creds.ca, "--protocol", "1")
    assert proc.returncode == 0, proc.stderr
    assert report["outcomes"]["sent"] == FRAMES
    log = finish(host)
    assert "a protocol-1 edge with the certificate for 'cam1' sent a frame of stream 'cam0'" in log
    assert saved(tmp_path, "cam0") == ["{:06d}.png".format(i) for i in range(FRAMES)]


# --- end to end: tokens ---------------------------------------------------------------------------------------------
def test_token_host_refuses_edges_without_the_token_and_serves_the_right_one(tmp_path, tiny_profile, creds):
    host, address = start_host(tmp_path, tiny_profile, "--token-file", creds.token)
    proc, _ = edge(address, tiny_profile, tmp_path, "cam0", "--token-file", creds.wrong_token)
    assert_refused(proc, "(host_not_authenticated)", "does not know this edge's token")
    proc, _ = edge(address, tiny_profile, tmp_path, "cam0")
    assert_refused(proc, "(unauthorized)", "this host requires a token", "--token-file")
    # A recorded handshake replayed: the host's new nonce makes the old AUTH worthless.
    reply = replay_handshake(address, creds.token)
    assert reply["reason"] == "unauthorized" and reply["permanent"] and "token is wrong" in reply["message"]
    assert host.poll() is None
    proc, report = edge(address, tiny_profile, tmp_path, "cam0", "--token-file", creds.token)
    assert_streamed(proc, report)
    log = finish(host)
    assert "it does not accept this host's token proof, so its --token-file holds another token" in log
    assert "refused stream 'cam0' (unauthorized): this host requires a token" in log
    assert "refused stream 'replayed' (unauthorized): the edge's token is wrong" in log
    assert saved(tmp_path, "cam0") == ["{:06d}.png".format(i) for i in range(FRAMES)]
    assert saved(tmp_path, "replayed") == []


def test_host_without_credentials_refuses_token_and_tls_edges(tmp_path, tiny_profile, creds):
    host, address = start_host(tmp_path, tiny_profile)
    proc, _ = edge(address, tiny_profile, tmp_path, "cam0", "--token-file", creds.token)
    assert_refused(proc, "(unauthorized)", "the edge has a token (--token-file) and this host has none")
    # A TLS edge meets a plain host: the host closes on the TLS handshake; after 3 such closes the edge stops.
    proc, _ = edge(address, tiny_profile, tmp_path, "cam0", "--tls", creds.ca)
    assert_refused(proc, "(no_answer)", "during the TLS handshake", "start the host with --tls DIR")
    proc, report = edge(address, tiny_profile, tmp_path, "cam0")
    assert_streamed(proc, report)
    log = finish(host)
    assert "refused stream 'cam0' (unauthorized): the edge has a token (--token-file) and this host has none" in log
    assert "a TLS handshake (an edge started with --tls?), and this host runs without --tls" in log


def hello_fields(stream, nonce=None):
    """A HELLO for the tiny model; with ``nonce``, from an edge that has a token."""
    fields = dict(versions=[2], stream=stream, session="0123456789abcdef", model_id=None, shape=[1, 8, 16, 16],
                  dtype="float32", packing="bits", entropy="none", tiles=[1, 1], delivery="live", window=4,
                  unacked=[], t_send=time.time())
    if nonce is not None:
        fields["nonce"] = nonce
    return fields


def exchange(address, data):
    """Send ``data`` on a new connection; returns (socket, the host's first answer as (kind, fields))."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(data)
    version, kind, meta_len = read_header(sock)
    return sock, (kind, read_body(sock, version, kind, meta_len)[0])


def replay_handshake(address, token_file):
    """A genuine token handshake for stream 'replayed', then its HELLO and AUTH replayed on a new connection;
    returns the host's answer to the replay (REFUSE fields)."""
    token = read_token(token_file)
    nonce = new_nonce()
    hello = encode_message(KIND_HELLO, **hello_fields("replayed", nonce))
    sock, (kind, challenge) = exchange(address, hello)
    assert kind == KIND_CHALLENGE
    assert proof_matches(host_proof(token, nonce, challenge["nonce"]), challenge["proof"])
    auth = encode_message(KIND_AUTH, proof=edge_proof(token, challenge["nonce"], nonce, "replayed",
                                                      "0123456789abcdef"))
    sock.sendall(auth)
    version, kind, meta_len = read_header(sock)
    assert kind == KIND_ACCEPT, read_body(sock, version, kind, meta_len)[0]
    sock.close()
    sock, (kind, second) = exchange(address, hello)  # the same HELLO, the same nonce
    assert kind == KIND_CHALLENGE and second["nonce"] != challenge["nonce"]
    sock.sendall(auth)
    version, kind, meta_len = read_header(sock)
    assert kind == KIND_REFUSE
    fields = read_body(sock, version, kind, meta_len)[0]
    sock.close()
    return fields


# --- the host's TLS, in one process ---------------------------------------------------------------------------------
@pytest.fixture
def tls_host(tiny_profile, tmp_path, creds):
    with running_host(tiny_profile, tmp_path, credentials=Credentials.for_host(creds.ca),
                      handshake_timeout_s=1.0) as server:
        yield server


def test_an_edge_without_a_certificate_is_refused_by_the_handshake(tls_host, creds, caplog):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(creds.ca, "ca.pem"))
    with caplog.at_level(logging.WARNING, logger="latentlink.host"):
        tls = connect_tls(socket.create_connection(tls_host.address), context, "127.0.0.1", 5)
        tls.sendall(b"LLNK")
        with pytest.raises(ssl.SSLError, match="(?i)certificate required"):  # TLS 1.3: the verdict comes now
            tls.recv(1)
        tls.close()
        wait_for(lambda: "the edge sent no certificate" in caplog.text)


def test_a_peer_that_never_finishes_the_tls_handshake_is_closed_and_others_are_served(tls_host, creds, caplog):
    silent = socket.create_connection(tls_host.address)
    trickle = socket.create_connection(tls_host.address)
    trickle.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
    with caplog.at_level(logging.WARNING, logger="latentlink.host"):
        # Meanwhile a genuine edge completes its handshake: the accept loop is not held.
        context = client_context(*(os.path.join(creds.ca, *p) for p in (["ca.pem"], ["edges", "cam0.pem"],
                                                                        ["edges", "cam0.key"])))
        tls = connect_tls(socket.create_connection(tls_host.address), context, "127.0.0.1", 5)
        tls.close()
        for sock in (silent, trickle):
            sock.settimeout(10)
            assert sock.recv(1) == b""  # closed by the host after its 1 s deadline
        wait_for(lambda: caplog.text.count("no TLS handshake within 1 s") == 2)


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- TLSSocket: two threads on one TLS connection --------------------------------------------------------------------
def tls_pair(creds, serve):
    """A TLS connection to a thread running ``serve(tls_socket)``; returns the client's SSL socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = server_context(*(os.path.join(creds.ca, p) for p in ("ca.pem", "host.pem", "host.key")))

    def run():
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            serve(tls)
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    client = client_context(*(os.path.join(creds.ca, *p) for p in (["ca.pem"], ["edges", "cam0.pem"],
                                                                   ["edges", "cam0.key"])))
    return connect_tls(socket.create_connection(listener.getsockname()), client, "127.0.0.1", 5)


def test_tls_socket_reads_and_writes_from_two_threads(creds):
    """The sender writes 8 MB while the reader reads the host's answers: every byte arrives, in order, both ways."""
    chunk = bytes(range(256)) * 256  # 64 KiB

    def serve(tls):  # acknowledge every 64 KiB with its digest, as the host acknowledges frames
        while True:
            data = bytearray()
            while len(data) < len(chunk):
                part = tls.recv(len(chunk) - len(data))
                if not part:
                    return
                data += part
            tls.sendall(hashlib.sha256(data).digest())

    sock = TLSSocket(tls_pair(creds, serve), send_timeout_s=10)
    sock.settimeout(None)
    answers = []

    def read():
        while len(answers) < 128:
            data = b""
            while len(data) < 32:
                data += sock.recv(32 - len(data))
            answers.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(128):
        sock.sendall(chunk)
    reader.join(60)
    assert answers == [hashlib.sha256(chunk).digest()] * 128
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_tls_socket_send_times_out_without_progress_and_close_wakes_the_reader(creds):
    stop = threading.Event()
    sock = TLSSocket(tls_pair(creds, lambda tls: stop.wait(30)), send_timeout_s=0.5)  # a host that never reads
    sock.settimeout(None)
    woke = []
    reader = threading.Thread(target=lambda: woke.append(sock.recv(1)), daemon=True)
    reader.start()
    with pytest.raises(socket.timeout, match="no progress"):
        for _ in range(1000):
            sock.sendall(b"x" * 65536)
    sock.shutdown(socket.SHUT_RDWR)  # as Link.close does: the reader, waiting for data, sees the end
    reader.join(10)
    assert woke == [b""]
    sock.close()
    stop.set()


# --- the protocol: CHALLENGE, AUTH and the proofs --------------------------------------------------------------------
def test_challenge_and_auth_round_trip_and_are_checked():
    nonce, proof = new_nonce(), "ab" * 32
    assert KIND_NAMES[KIND_CHALLENGE] == "CHALLENGE" and KIND_NAMES[KIND_AUTH] == "AUTH"
    assert "unauthorized" in PERMANENT_REFUSALS
    data = encode_message(KIND_CHALLENGE, nonce=nonce, proof=proof)
    assert parse_fields(KIND_CHALLENGE, data[8:]) == {"nonce": nonce, "proof": proof}
    assert parse_fields(KIND_AUTH, encode_message(KIND_AUTH, proof=proof)[8:]) == {"proof": proof}
    bad = [(KIND_CHALLENGE, {"nonce": "12", "proof": proof}, "nonce '12' is not 32 to 64 lowercase hex digits"),
           (KIND_CHALLENGE, {"nonce": nonce.upper(), "proof": proof}, "lowercase hex"),
           (KIND_CHALLENGE, {"nonce": nonce}, "proof None is not 64 lowercase hex digits"),
           (KIND_AUTH, {"proof": proof[:-1]}, "is not 64 lowercase hex digits (an HMAC-SHA256)"),
           (KIND_AUTH, {"proof": 7}, "proof 7 is not 64"),
           (KIND_HELLO, hello_fields("cam0", "xyz"), "nonce 'xyz' is not 32 to 64 lowercase hex digits")]
    for kind, fields, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            encode_message(kind, **fields)
        with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_fields(kind, json.dumps(fields).encode())
    assert parse_fields(KIND_HELLO, json.dumps(hello_fields("cam0", nonce)).encode())["nonce"] == nonce
    # an edge without a token sends none
    assert parse_fields(KIND_HELLO, json.dumps(hello_fields("cam0")).encode())["nonce"] is None


def test_proofs_bind_the_token_both_nonces_the_stream_and_the_session():
    token, edge_nonce, host_nonce = b"k" * 32, new_nonce(), new_nonce()
    assert edge_nonce != host_nonce and len(edge_nonce) == 32
    auth = edge_proof(token, host_nonce, edge_nonce, "cam0", "0123456789abcdef")
    assert len(auth) == 64 and proof_matches(auth, edge_proof(token, host_nonce, edge_nonce, "cam0",
                                                              "0123456789abcdef"))
    # An AUTH recorded for another host nonce (a replay), or another stream, session or token, does not match.
    for other in (edge_proof(token, new_nonce(), edge_nonce, "cam0", "0123456789abcdef"),
                  edge_proof(token, host_nonce, new_nonce(), "cam0", "0123456789abcdef"),
                  edge_proof(token, host_nonce, edge_nonce, "cam1", "0123456789abcdef"),
                  edge_proof(token, host_nonce, edge_nonce, "cam0", "fedcba9876543210"),
                  edge_proof(b"j" * 32, host_nonce, edge_nonce, "cam0", "0123456789abcdef")):
        assert not proof_matches(auth, other)
    # The host's proof is labelled apart: it can never pass for an edge's, nor the other way round.
    assert host_proof(token, edge_nonce, host_nonce) != edge_proof(token, edge_nonce, host_nonce, "", "")
    assert not proof_matches(host_proof(token, edge_nonce, host_nonce), host_proof(token, host_nonce, edge_nonce))


def test_token_files(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_bytes(b"  " + b"a" * 40 + b"\n")
    os.chmod(str(path), 0o600)
    with caplog.at_level(logging.WARNING):
        assert read_token(str(path)) == b"a" * 40
    assert caplog.text == ""
    os.chmod(str(path), 0o644)
    with caplog.at_level(logging.WARNING):
        read_token(str(path))
    assert "can be read by other users (mode 644): chmod 600" in caplog.text
    for content, message in ((b"\n", "holds 0 bytes: a token needs at least 16"), (b"short", "holds 5 bytes")):
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            read_token(str(path))
    with pytest.raises(ConfigError, match="cannot read --token-file .*missing.*latentlink keys token"):
        read_token(str(tmp_path / "missing"))


# --- latentlink keys ------------------------------------------------------------------------------------------------
def test_keys_writes_a_ca_host_and_edge_certificates(tmp_path, capsys):
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    folder = str(tmp_path / "k")
    assert keys.main(["init", folder, "--host-name", "10.0.0.7", "--host-name", "gpu.local"]) == 0
    out = capsys.readouterr().out
    assert "wrote {}".format(os.path.join(folder, "ca.key")) in out and "latentlink keys edge" in out
    assert keys.main(["edge", folder, "cam7"]) == 0
    out = capsys.readouterr().out
    assert "never copy ca.key" in out and "--tls keys/ --name cam7" in out
    for name in ("ca.key", "host.key", os.path.join("edges", "cam7.key")):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
    with open(os.path.join(folder, "edges", "cam7.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam7"
    with open(os.path.join(folder, "host.pem"), "rb") as f:
        sans = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert sans.get_values_for_type(x509.DNSName) == ["gpu.local"]
    # Python's ssl loads what was written (the edge's context; the host's)
    Credentials.for_edge(folder, "cam7")
    Credentials.for_host(folder)

    # Refusals: a second CA over the first, an edge certificate twice, bad names, no CA.
    assert keys.main(["init", folder]) == 2
    assert "already holds a CA" in capsys.readouterr().err
    assert keys.main(["edge", folder, "cam7"]) == 2
    assert "use --force to replace it" in capsys.readouterr().err
    assert keys.main(["edge", folder, "cam7", "--force"]) == 0
    assert keys.main(["edge", folder, "../x"]) == 2
    assert "bad stream name '../x'" in capsys.readouterr().err
    assert keys.main(["edge", str(tmp_path / "none"), "cam0"]) == 2
    assert "make the CA first with `latentlink keys init" in capsys.readouterr().err
    assert keys.main(["init", str(tmp_path / "k2"), "--host-name", "gpu:5760"]) == 2
    assert "bad --host-name 'gpu:5760'" in capsys.readouterr().err


def test_keys_without_cryptography_says_what_to_install(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_cryptography(name, *args, **kwargs):
        if name.startswith("cryptography"):
            raise ImportError("No module named 'cryptography'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cryptography)
    assert keys.main(["init", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'latentlink[keys]'" in err
    assert keys.main(["token", str(tmp_path / "t")]) == 0  # a token needs no cryptography


def test_edge_options_name_missing_files_and_bad_combinations(tmp_path, creds, capsys):
    from latentlink.edge.__main__ import main

    base = ["--source", "synthetic://", "--profile", "nano-504", "--frames", "1", "--name", "cam9"]
    assert main(base + ["--tls", creds.ca]) == 2
    err = capsys.readouterr().err
    assert "no certificate for stream 'cam9'" in err and "latentlink keys edge DIR cam9" in err
    assert main(base + ["--tls-ca", "ca.pem"]) == 2
    assert "--tls-ca goes with --tls DIR" in capsys.readouterr().err
    assert main(base + ["--token-file", creds.token, "--protocol", "1"]) == 2
    assert "protocol 1 does not have" in capsys.readouterr().err


@pytest.mark.skipif(sys.version_info < (3, 8), reason="host/ needs Python 3.8+ (this file also runs on the edge's 3.6)")
def test_host_warns_when_anyone_on_the_network_can_stream_into_it(caplog):
    import argparse

    from latentlink.host.__main__ import log_credentials

    args = argparse.Namespace(out="frames", token_file=None)
    with caplog.at_level(logging.INFO, logger="latentlink.host"):
        log_credentials(args, ("127.0.0.1", 5760), Credentials())
        log_credentials(args, ("::1", 5760), Credentials())
        assert caplog.text == ""
        log_credentials(args, ("0.0.0.0", 5760), Credentials())
        assert ("anyone who can reach 0.0.0.0:5760 can stream into this host and write files under --out; use --tls "
                "DIR (latentlink keys init) or --token-file") in caplog.text
        caplog.clear()
        log_credentials(args, ("0.0.0.0", 5760), Credentials(token=b"t" * 32))
        assert "anyone" not in caplog.text and "token: edges must prove" in caplog.text


@pytest.mark.parametrize("answer", ["accept", "bad-proof"])
def test_an_edge_with_a_token_refuses_a_host_that_does_not_prove_it_has_it(answer):
    """An impostor host: it answers ACCEPT without a CHALLENGE, or a CHALLENGE whose proof is not the token's."""
    from latentlink.edge.errors import HostRefused
    from latentlink.edge.sender import Link

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    heard = []

    def impostor():
        conn, _ = listener.accept()
        version, kind, meta_len = read_header(conn)
        heard.append(read_body(conn, version, kind, meta_len)[0])
        if answer == "accept":
            conn.sendall(encode_message(KIND_ACCEPT, version=2, window=4, max_frame_bytes=1 << 20, acked=[],
                                        t_recv=time.time(), t_send=time.time()))
        else:
            conn.sendall(encode_message(KIND_CHALLENGE, nonce=new_nonce(), proof="0" * 64))
        conn.settimeout(5)
        heard.append(conn.recv(1))  # what the edge sends next: nothing, it hangs up
        conn.close()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    hello = {k: v for k, v in hello_fields("cam0").items() if k != "t_send"}
    with pytest.raises(HostRefused) as refused:
        Link(listener.getsockname(), VERSION_2, hello, None, None, credentials=Credentials(token=b"t" * 32))
    thread.join(10)
    listener.close()
    assert refused.value.reason == "host_not_authenticated" and refused.value.permanent
    assert ("without proving it knows the token" if answer == "accept" else "its CHALLENGE proof is wrong") in str(
        refused.value)
    assert heard[0]["nonce"] is not None and heard[1] == b""  # no AUTH for an impostor's nonce


def test_the_host_lingers_so_that_a_refused_edge_reads_why(tls_host, creds):
    """The edge (TLS 1.3) sends its HELLO right after its side of the handshake, before the host has judged its
    certificate. Were the host to close with that HELLO unread, the edge's kernel would get a reset instead of the
    host's alert; the host reads what is left before closing, so the edge learns why."""
    context = client_context(os.path.join(creds.ca, "ca.pem"), os.path.join(creds.other, "edges", "cam0.pem"),
                             os.path.join(creds.other, "edges", "cam0.key"))
    for _ in range(5):  # without the lingering close most tries get a reset (a race, so more than one try)
        tls = connect_tls(socket.create_connection(tls_host.address), context, "127.0.0.1", 5)
        tls.sendall(encode_message(KIND_HELLO, **hello_fields("cam0")))
        time.sleep(0.3)  # the host has refused the certificate by now, and its alert is on the way
        with pytest.raises(ssl.SSLError, match="(?i)unknown ca"):
            tls.recv(1)
        tls.close()
