"""Credentials on the link between edge and host: TLS with the certificates of ``latentlink keys``, or a shared token
proved in the handshake. Python 3.6 (the Nano) like all of ``edge/``: the stdlib's ``ssl``, ``hmac`` and ``hashlib``.

**TLS** (``--tls DIR``): TLS 1.2 or newer, both sides authenticated by the private CA in ``DIR/ca.pem``. The host
presents ``DIR/host.pem`` and requires a client certificate; the edge presents ``DIR/edges/NAME.pem`` and checks that
the host's certificate names the address it connects to. The edge certificate's common name is a stream name: the
host serves a stream only under the name its certificate carries.

**Token** (``--token-file FILE``): no encryption, but no edge streams without the token and no impostor host passes
for the real one. The token never crosses the wire; each side proves it knows the token with an HMAC-SHA256 over both
sides' fresh nonces (:func:`host_proof`, :func:`edge_proof`), so a recorded handshake cannot be replayed:

    edge -> host  HELLO      nonce = N_e (random)
    host -> edge  CHALLENGE  nonce = N_h (random), proof = HMAC(token, "latentlink-host|" N_e "|" N_h)
    edge -> host  AUTH       proof = HMAC(token, "latentlink-edge|" N_h "|" N_e "|" stream "|" session)
    host -> edge  ACCEPT, or REFUSE "unauthorized"

The edge checks the host's proof before it answers (a host that does not know the token learns nothing it could
replay: its nonce is answered only once the edge knows the host is genuine), and the labels keep either proof from
standing in for the other. What follows the handshake is not protected: on a network where someone could alter
traffic, use TLS.
"""

import hashlib
import hmac
import logging
import os
import select
import socket
import ssl
import stat
import threading
import time

from .errors import ConfigError

log = logging.getLogger("latentlink.edge")

MIN_TOKEN_BYTES = 16  # shorter tokens can be guessed offline from one recorded handshake
NONCE_BYTES = 16
HANDSHAKE_TIMEOUT_S = 10.0  # the host's bound on a TLS handshake (a peer that never finishes it)


# --- files ------------------------------------------------------------------------------------------------------
def _need(path, what, fix):
    if not os.path.isfile(path):
        raise ConfigError("no {} at {}: {}".format(what, path, fix))
    return path


def edge_tls_files(folder, name, ca_file=None):
    """``(ca, certificate, key)`` paths for the edge streaming as ``name``: ``folder``/ca.pem (or ``ca_file``),
    ``folder``/edges/NAME.pem and NAME.key, each checked to exist."""
    ca = _need(ca_file or os.path.join(folder, "ca.pem"), "CA certificate",
               "copy ca.pem from the folder of `latentlink keys init` (or give --tls-ca)")
    fix = ("make it where the CA is with `latentlink keys edge DIR {0}` and copy edges/{0}.pem and edges/{0}.key to "
           "{1} (the certificate's name must be this edge's --name)".format(name, os.path.join(folder, "edges")))
    cert = _need(os.path.join(folder, "edges", name + ".pem"), "certificate for stream {!r}".format(name), fix)
    key = _need(os.path.join(folder, "edges", name + ".key"), "key for stream {!r}".format(name), fix)
    return ca, cert, key


def host_tls_files(folder):
    """``(ca, certificate, key)``: ``folder``/ca.pem, host.pem and host.key, each checked to exist."""
    fix = "make them with `latentlink keys init {}`".format(folder)
    return (_need(os.path.join(folder, "ca.pem"), "CA certificate", fix),
            _need(os.path.join(folder, "host.pem"), "host certificate", fix),
            _need(os.path.join(folder, "host.key"), "host key", fix))


# --- TLS contexts -----------------------------------------------------------------------------------------------
def client_context(ca, cert, key):
    """The edge's TLS context: trusts only ``ca``, checks the host's name, presents ``cert``/``key``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname, in 3.6 as now
    return _load(context, ca, cert, key)


def server_context(ca, cert, key):
    """The host's TLS context: presents ``cert``/``key``, requires a client certificate signed by ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    return _load(context, ca, cert, key)


def _load(context, ca, cert, key):
    # TLS 1.2 at least. Python 3.6 has no minimum_version (3.7+): there the options say it.
    tls_version = getattr(ssl, "TLSVersion", None)
    if tls_version is not None:
        context.minimum_version = tls_version.TLSv1_2  # novermin (3.7+: only where TLSVersion exists)
    else:
        context.options |= ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot read the CA certificate {} ({}): give the ca.pem of `latentlink keys init`".format(
            ca, exc))
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot load certificate {} with key {} ({}): are they a pair written by `latentlink "
                          "keys`?".format(cert, key, exc))
    return context


def peer_name(sock):
    """The common name in the peer's verified certificate (the edge's stream name), or None."""
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _text(exc):
    return "{} {}".format(getattr(exc, "verify_message", "") or "", exc).lower()


# Alerts by which a host turns down this edge's certificate: nothing a retry could change.
_REJECTED_BY_HOST = (("alert unknown ca", "the host does not trust this edge's certificate: it was signed by another "
                      "CA than the host's (made by another `latentlink keys init`?); issue it from the host's CA "
                      "with `latentlink keys edge DIR NAME`"),
                     ("alert certificate required", "the host requires a certificate and got none"),
                     ("alert certificate expired", "the host says this edge's certificate has expired: issue a new "
                      "one with `latentlink keys edge DIR NAME --force`"),
                     ("alert bad certificate", "the host rejected this edge's certificate"),
                     ("alert certificate unknown", "the host rejected this edge's certificate"),
                     ("alert unsupported certificate", "the host rejected this edge's certificate"),
                     ("alert certificate revoked", "the host rejected this edge's certificate"),
                     ("alert access denied", "the host rejected this edge's certificate"),
                     ("alert handshake failure", "the host and this edge could not agree on TLS (the host requires "
                      "a certificate, or TLS 1.2+)"),
                     ("alert protocol version", "the host and this edge have no TLS version in common (1.2+ "
                      "needed)"))


def explain_client_tls_error(exc, where, ca):
    """What a TLS failure of the edge's connection to ``where`` means: ``(message, permanent)``.

    Permanent (the edge stops with the message, exit status 1): the host's certificate does not verify against
    ``ca`` or does not name the address the edge connects to; the host rejected the edge's certificate; no TLS
    version in common; the peer does not speak TLS. Not permanent (retried with backoff, like a host that is down):
    a connection closed or reset during the handshake, and timeouts.
    """
    text = _text(exc)
    if (isinstance(exc, ssl.CertificateError) and not isinstance(exc, ssl.SSLError)) or "mismatch" in text:
        # Python 3.6 checks the name itself after the handshake (ssl.CertificateError); 3.7+ has OpenSSL do it.
        host = where.rsplit(":", 1)[0]
        return ("the host's certificate is not valid for {!r}, the address this edge connects to ({}): issue "
                "the host a certificate naming it (`latentlink keys host DIR --host-name {}`), or --connect to a "
                "name its certificate has".format(host, exc, host)), True
    if "certificate verify failed" in text:
        return ("the host at {} presented a certificate that {} does not vouch for ({}): is it the ca.pem of "
                "the host's `latentlink keys init`, and is --connect pointing at the right host?".format(
                    where, ca, getattr(exc, "verify_message", None) or exc)), True
    rejected = rejected_by_host(exc, where)
    if rejected is not None:
        return rejected, True
    if "wrong version number" in text or "record layer failure" in text or "unknown protocol" in text:
        return ("the host at {} does not speak TLS ({}): start it with --tls DIR, or drop --tls from this "
                "edge".format(where, exc)), True
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, socket.timeout)) or \
            "eof occurred" in text or "unexpected eof" in text:
        return "the host at {} closed the connection during the TLS handshake ({})".format(where, exc), False
    if isinstance(exc, ssl.SSLError):  # any other TLS error: a configuration matter, not a passing one
        return "the TLS handshake with {} failed: {}".format(where, exc), True
    return "the connection to {} failed during the TLS handshake: {}".format(where, exc), False


def rejected_by_host(exc, where):
    """If ``exc`` is the host's TLS alert turning down this edge's certificate, what it means; else None."""
    text = _text(exc)
    for alert, meaning in _REJECTED_BY_HOST:
        if alert in text:
            return "{} ({}: {})".format(meaning, where, exc)
    return None


def explain_server_tls_error(exc, ca):
    """One line for the host's log: why an edge's TLS handshake failed, and what to do."""
    text = _text(exc)
    if "peer did not return a certificate" in text or "certificate required" in text:
        return ("the edge sent no certificate: start it with --tls DIR (its certificate from `latentlink keys edge "
                "DIR NAME`)")
    if "certificate verify failed" in text:
        detail = getattr(exc, "verify_message", None) or exc
        if "issuer" in text or "self-signed" in text or "self signed" in text:
            return ("the edge's certificate is not signed by this host's CA {} ({}): issue it with `latentlink keys "
                    "edge DIR NAME` from the same folder as the host's".format(ca, detail))
        if "expired" in text:
            return ("the edge's certificate has expired ({}): issue a new one with `latentlink keys edge DIR NAME "
                    "--force`".format(detail))
        return ("the edge's certificate does not verify against {} ({}): edges need a certificate of `latentlink "
                "keys edge DIR NAME`".format(ca, detail))
    if "alert unknown ca" in text or "alert bad certificate" in text or "alert certificate unknown" in text:
        return ("the edge rejected this host's certificate ({}): its ca.pem is from another `latentlink keys init`, "
                "or this host's certificate does not name the address the edge connects to (`latentlink keys host "
                "DIR --host-name ADDRESS`)".format(exc))
    if "wrong version number" in text or "http request" in text or "unknown protocol" in text:
        return "the peer does not speak TLS ({})".format(exc)
    if isinstance(exc, socket.timeout):
        return str(exc) or "no TLS handshake in time"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)) or "eof" in text:
        return "the edge closed the connection during the TLS handshake ({})".format(exc)
    return "TLS error: {}".format(exc)


class TLSSocket(object):
    """An SSL socket shared by the link's two threads: the sender thread writes, the reader thread reads.

    One OpenSSL connection must never be used by two threads at once (OpenSSL's rule; Python's ``ssl`` does not lock
    it for us), yet the reader waits in ``recv`` while the sender sends. So the SSL socket is non-blocking, every SSL
    call is made under one lock and returns at once, and the waiting (``select``) happens outside the lock.
    ``sendall`` fails with ``socket.timeout`` after ``send_timeout_s`` seconds without progress, as SO_SNDTIMEO makes
    a plain socket's send fail (a blocking SSL socket would retry a timed-out write at once, forever). ``recv`` honours
    :meth:`settimeout` (None: wait for ever) like a socket, so :func:`~latentlink.edge.protocol.recv_exactly` works
    unchanged.
    """

    def __init__(self, sock, send_timeout_s):
        self._ssl = sock
        self._ssl.setblocking(False)
        self._lock = threading.Lock()
        self._timeout = None
        self._closed = False
        self.send_timeout_s = send_timeout_s

    def settimeout(self, seconds):
        self._timeout = seconds

    def setsockopt(self, *args):
        self._ssl.setsockopt(*args)

    def getpeercert(self):
        return self._ssl.getpeercert()

    def _call(self, method, arg):
        """One non-blocking SSL call under the lock: ``(result, None)``, or ``(None, "read" / "write")`` when it
        must wait for the socket first."""
        with self._lock:
            if self._closed:
                return b"", None
            try:
                return method(arg), None
            except ssl.SSLWantReadError:
                return None, "read"
            except ssl.SSLWantWriteError:
                return None, "write"

    def _wait(self, want, deadline, why):
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise socket.timeout(why)
        try:  # wakes on data, on room to write, or on close(): its shutdown makes the socket readable
            select.select([self._ssl] if want == "read" else [], [self._ssl] if want == "write" else [], [], timeout)
        except (OSError, ValueError):  # closed meanwhile (fileno -1): the next _call says so
            pass

    def recv(self, n):
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            data, want = self._call(self._ssl.recv, n)
            if want is None:
                return data
            self._wait(want, deadline, "timed out")

    def sendall(self, data):
        view = memoryview(data)
        deadline = time.monotonic() + self.send_timeout_s
        while len(view):
            sent, want = self._call(self._ssl.send, view)  # after a "want", retried with the very same bytes
            if self._closed:
                raise ConnectionResetError("the connection was closed")
            if want is None:
                view = view[sent:]
                deadline = time.monotonic() + self.send_timeout_s  # progress: the timeout counts from here
            else:
                self._wait(want, deadline, "no progress for {:.0f} s".format(self.send_timeout_s))

    def shutdown(self, how):
        """Closes for both threads: the reader's next ``recv`` returns b"" (end of stream), a send fails."""
        with self._lock:
            self._closed = True
        socket.socket.shutdown(self._ssl, how)  # the TCP socket's: the SSL object stays with whoever holds it

    def close(self):
        with self._lock:
            self._closed = True
            self._ssl.close()


def connect_tls(sock, context, host_name, timeout_s):
    """Wrap the connected TCP ``sock`` in TLS as a client of ``host_name``, the handshake done within ``timeout_s``
    seconds; returns the SSL socket, closed on failure (``ssl.SSLError``, ``ssl.CertificateError``,
    ``socket.timeout`` or ``OSError``)."""
    tls = context.wrap_socket(sock, server_hostname=host_name, do_handshake_on_connect=False)
    try:
        return handshake(tls, timeout_s)
    except BaseException:
        tls.close()
        raise


def handshake(tls, timeout_s=HANDSHAKE_TIMEOUT_S, deadline=None):
    """Complete the handshake of ``tls`` (an SSL socket wrapped with ``do_handshake_on_connect=False``) within
    ``timeout_s`` seconds in all (or by ``deadline``, a ``time.monotonic()`` value, if given): non-blocking steps with
    a select between them, so that a peer sending its handshake a byte at a time cannot stretch it. Returns ``tls``,
    its timeout set to ``timeout_s``."""
    if deadline is None:
        deadline = time.monotonic() + timeout_s
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()  # on Python 3.6 a client's also checks the host name (ssl.CertificateError)
            break
        except ssl.SSLWantReadError:
            wait = ([tls], [])
        except ssl.SSLWantWriteError:
            wait = ([], [tls])
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no TLS handshake within {:.0f} s".format(timeout_s))
        select.select(wait[0], wait[1], [], left)
    tls.settimeout(timeout_s)
    return tls


def linger_close(sock, timeout_s=1.0):
    """Close ``sock`` so that what was last sent (a TLS alert, a REFUSE) reaches the peer: closing with unread bytes
    from the peer would reset the connection, and the peer would lose our last bytes with it. Says end of stream,
    reads what the peer still sends (``timeout_s`` at most), then closes."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)  # the TCP socket's own: no TLS close_notify exchange
        sock.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and socket.socket.recv(sock, 65536):
            pass
    except OSError:
        pass
    sock.close()


# --- tokens -----------------------------------------------------------------------------------------------------
def read_token(path):
    """The token in ``path`` (bytes, surrounding whitespace stripped); refuses a missing, empty or short one and warns
    when others may read the file."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError("cannot read --token-file {} ({}): make one with `latentlink keys token {}` and copy it "
                          "to the host and the edges".format(path, exc.strerror or exc, path))
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError("--token-file {} holds {} bytes: a token needs at least {} (make one with `latentlink keys "
                          "token FILE`, 64 random hex digits)".format(path, len(token), MIN_TOKEN_BYTES))
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--token-file %s can be read by other users (mode %o): chmod 600 %s", path,
                    stat.S_IMODE(mode), path)
    return token


def new_nonce():
    """A fresh random nonce: 16 bytes as 32 lowercase hex digits."""
    return os.urandom(NONCE_BYTES).hex()


def _mac(token, *parts):
    return hmac.new(token, "|".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()


def host_proof(token, edge_nonce, host_nonce):
    """The host's proof that it knows ``token``, for the edge's nonce (CHALLENGE's ``proof``): 64 hex digits."""
    return _mac(token, "latentlink-host", edge_nonce, host_nonce)


def edge_proof(token, host_nonce, edge_nonce, stream, session):
    """The edge's proof that it knows ``token``, for the host's nonce and this stream and session (AUTH's
    ``proof``): 64 hex digits."""
    return _mac(token, "latentlink-edge", host_nonce, edge_nonce, stream, session)


def proof_matches(expected, received):
    """Compare proofs in constant time (a timing difference would reveal how many leading digits were right)."""
    return hmac.compare_digest(expected.encode("ascii"), received.encode("ascii"))


class Credentials(object):
    """What one side brings to the handshake: a TLS context (``tls``; with its CA file ``ca`` for messages), a
    token (bytes), either, both or neither."""

    def __init__(self, tls=None, ca=None, token=None):
        self.tls, self.ca, self.token = tls, ca, token

    def __bool__(self):
        return self.tls is not None or self.token is not None

    @classmethod
    def for_edge(cls, tls_dir=None, name=None, ca_file=None, token_file=None):
        """From the edge's --tls DIR (with its stream ``name``), --tls-ca and --token-file."""
        tls = ca = None
        if tls_dir:
            ca, cert, key = edge_tls_files(tls_dir, name, ca_file)
            tls = client_context(ca, cert, key)
        elif ca_file:
            raise ConfigError("--tls-ca goes with --tls DIR (the folder with edges/NAME.pem and NAME.key)")
        return cls(tls, ca, read_token(token_file) if token_file else None)

    @classmethod
    def for_host(cls, tls_dir=None, token_file=None):
        """From the host's --tls DIR and --token-file."""
        tls = ca = None
        if tls_dir:
            ca, cert, key = host_tls_files(tls_dir)
            tls = server_context(ca, cert, key)
        return cls(tls, ca, read_token(token_file) if token_file else None)
