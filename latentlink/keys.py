"""``latentlink keys``: make the credentials for ``--tls`` (a private CA, the host's and each edge's certificate) or
``--token-file``.

A private certificate authority signs everything: the host trusts the edge certificates its CA signed, and an edge's
certificate carries its stream name (the subject's common name), so an edge can stream under that name only. Edges
trust the host certificate the same CA signed, for the names and addresses given with ``--host-name``.

Files under DIR: ``ca.pem`` (the CA certificate: both sides need it), ``ca.key`` (the CA's private key: keep it on
the machine that issues certificates, never on an edge), ``host.pem`` + ``host.key`` (the host's), and
``edges/NAME.pem`` + ``edges/NAME.key`` (one pair per edge). Keys are ECDSA P-256, written without a passphrase and
readable by their owner only (mode 0600). Certificates are valid for ``--days`` (default 3650, ten years).

Runs on the host or a workstation (it needs the ``cryptography`` package: ``pip install 'latentlink[keys]'``); edges
only read the files, with Python's own ``ssl``. ``latentlink keys token FILE`` needs nothing beyond Python.
"""

import datetime
import ipaddress
import os
import secrets
import sys

from latentlink.edge.errors import ConfigError
from latentlink.edge.protocol import check_stream_name
from latentlink.edge.security import MIN_TOKEN_BYTES

EXAMPLES = """examples:
  latentlink keys init keys/ --host-name 192.168.1.20 --host-name gpu-box.local
  latentlink keys edge keys/ cam0
  latentlink keys host keys/ --host-name 192.168.1.21      (a new host certificate from the same CA)
  latentlink keys token token.txt                         (for --token-file instead of TLS)

then, on the host:  latentlink host --listen 0.0.0.0:5760 --tls keys/ --out frames/
and on the edge:    latentlink edge --source csi://0 --connect 192.168.1.20:5760 --name cam0 --tls keys/
(the edge needs keys/ca.pem and keys/edges/cam0.pem + cam0.key only: never ca.key)"""

DEFAULT_HOST_NAMES = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 3650


def _crypto():
    """The cryptography modules, or a one-line error naming the package to install."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("latentlink keys needs the cryptography package: pip install 'latentlink[keys]' (on the "
                          "host or a workstation; edges need only the files it writes)")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def get_args_parser():
    from latentlink.edge.cli import ArgumentParser, Number  # one-line errors and checked numbers, as every command

    parser = ArgumentParser(prog="latentlink keys", description="make the credentials for --tls (a private CA, the "
                            "host's and each edge's certificate) or --token-file", epilog=EXAMPLES)
    commands = parser.add_subparsers(dest="command", metavar="{init,host,edge,token}")
    commands.required = True
    init = commands.add_parser("init", help="a new CA and a host certificate signed by it")
    init.add_argument("dir", help="folder for ca.pem, ca.key, host.pem, host.key (created)")
    _host_names(init)
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA: every certificate it signed stops working")
    host = commands.add_parser("host", help="a new host certificate from the existing CA (other names or addresses)")
    host.add_argument("dir", help="the folder of `keys init`")
    _host_names(host)
    edge = commands.add_parser("edge", help="a certificate for the edge streaming as NAME, signed by the CA")
    edge.add_argument("dir", help="the folder of `keys init`")
    edge.add_argument("name", help="the edge's stream name (its --name): the only name it may stream as")
    edge.add_argument("--force", action="store_true", help="replace an existing certificate for NAME")
    for sub in (init, host, edge):
        sub.add_argument("--days", type=Number(int, low=1), default=DEFAULT_DAYS,
                         help="days the certificate is valid (default: %(default)s)")
    token = commands.add_parser("token", help="a random token for --token-file (mode 0600)")
    token.add_argument("file", help="where to write it")
    token.add_argument("--force", action="store_true", help="replace an existing file")
    return parser


def _host_names(parser):
    parser.add_argument("--host-name", action="append", metavar="NAME",
                        help="a DNS name or IP address edges --connect to (repeat for several; default: {})".format(
                            " and ".join(DEFAULT_HOST_NAMES)))


def main(argv=None):
    from latentlink.edge.cli import run_main

    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    if args.command == "token":
        written = write_token(args.file, force=args.force)
        print("wrote {} ({} random bytes as hex, mode 0600)".format(written, TOKEN_BYTES))
        print("next: copy it to the host and to every edge (keep it secret), then\n"
              "  latentlink host --listen 0.0.0.0:5760 --token-file {0} ...\n"
              "  latentlink edge --connect HOST:5760 --token-file {0} ...".format(args.file))
        return 0
    if args.days < 1:
        raise ConfigError("bad --days {}: give a number of days >= 1".format(args.days))
    if args.command == "init":
        names = args.host_name or list(DEFAULT_HOST_NAMES)
        written = init(args.dir, names, days=args.days, force=args.force)
        _print_written(written)
        print("next:\n  latentlink keys edge {0} NAME                  (one per edge: NAME is its --name)\n"
              "  latentlink host --tls {0} --listen 0.0.0.0:5760 ...\n"
              "edges --connect to one of: {1}".format(args.dir, ", ".join(names)))
    elif args.command == "host":
        names = args.host_name or list(DEFAULT_HOST_NAMES)
        _print_written(issue_host(args.dir, names, days=args.days))
        print("next: restart the host with --tls {}; edges --connect to one of: {}".format(args.dir, ", ".join(names)))
    else:
        written = issue_edge(args.dir, args.name, days=args.days, force=args.force)
        _print_written(written)
        print("next: copy {ca} and {pem} + {key} to the edge, keeping the layout (DIR/ca.pem, DIR/edges/{name}.pem, "
              "DIR/edges/{name}.key), e.g.\n"
              "  ssh EDGE mkdir -p keys/edges && scp {ca} EDGE:keys/ && scp {pem} {key} EDGE:keys/edges/\n"
              "then on the edge: latentlink edge --tls keys/ --name {name} --connect HOST:5760 ...\n"
              "(never copy ca.key to an edge)".format(ca=os.path.join(args.dir, "ca.pem"), pem=written[0],
                                                        key=written[1], name=args.name))
    return 0


def _print_written(paths):
    for path in paths:
        print("wrote {}".format(path))


# --- the certificates ---------------------------------------------------------------------------------------------
def init(folder, host_names, days=DEFAULT_DAYS, force=False):
    """A new CA under ``folder`` and a host certificate for ``host_names``; returns the paths written."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    ca_pem, ca_key = os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")
    if not force and (os.path.exists(ca_pem) or os.path.exists(ca_key)):
        raise ConfigError("{} already holds a CA (ca.pem / ca.key): replacing it would invalidate every certificate "
                          "it signed. Use another folder, `latentlink keys edge {}` / `keys host` to issue more "
                          "certificates from it, or --force to replace it".format(folder, folder))
    _check_host_names(host_names)
    os.makedirs(folder, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latentlink CA {}".format(secrets.token_hex(4)))])
    start, end = _validity(days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(ca_key, key)
    _write(ca_pem, cert.public_bytes(serialization.Encoding.PEM))
    return [ca_pem, ca_key] + issue_host(folder, host_names, days)


def issue_host(folder, host_names, days=DEFAULT_DAYS):
    """A host certificate (``folder``/host.pem, host.key) for ``host_names``, signed by the folder's CA."""
    x509, _, _, _, ExtendedKeyUsageOID, NameOID = _crypto()
    _check_host_names(host_names)
    sans = []
    for host_name in host_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host_name)))
        except ValueError:
            sans.append(x509.DNSName(host_name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_names[0])])
    return _issue(folder, "host", subject, [x509.SubjectAlternativeName(sans)], ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_edge(folder, name, days=DEFAULT_DAYS, force=False):
    """An edge certificate (``folder``/edges/NAME.pem, NAME.key) whose common name is the stream ``name``."""
    x509, _, _, _, ExtendedKeyUsageOID, NameOID = _crypto()
    check_stream_name(name, ConfigError)
    pem = os.path.join(folder, "edges", name + ".pem")
    if not force and os.path.exists(pem):
        raise ConfigError("{} exists: the edge {!r} has a certificate already (use --force to replace it)".format(
            pem, name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return _issue(folder, os.path.join("edges", name), subject, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def _issue(folder, stem, subject, extensions, usage, days):
    """A certificate for ``subject`` signed by the CA under ``folder``; writes ``stem``.pem and ``stem``.key."""
    x509, hashes, serialization, ec, _, _ = _crypto()
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pem, key_path = os.path.join(folder, stem + ".pem"), os.path.join(folder, stem + ".key")
    os.makedirs(os.path.dirname(pem), exist_ok=True)
    _write_key(key_path, key)
    _write(pem, cert.public_bytes(serialization.Encoding.PEM))
    return [pem, key_path]


def _load_ca(folder):
    x509, _, serialization, _, _, _ = _crypto()
    paths = [os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")]
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError("no {} : make the CA first with `latentlink keys init {}` (or give the folder "
                              "that holds ca.pem and ca.key)".format(path, folder))
    with open(paths[0], "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(paths[1], "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return cert, key


def _check_host_names(names):
    if not names:
        raise ConfigError("give at least one --host-name (the name or address edges --connect to)")
    for name in names:
        if not name or any(c.isspace() for c in name) or "/" in name or (":" in name and not _is_ip(name)):
            raise ConfigError("bad --host-name {!r}: give a DNS name (gpu-box.local) or an IP address "
                              "(192.168.1.20), without a port".format(name))


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _validity(days):
    """From an hour ago (clocks of small machines drift) to ``days`` from now, in UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def _write(path, data, mode=0o644):
    """Write ``data`` to ``path`` (replacing it) with permission bits ``mode``, set before any byte is written."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # the umask may have narrowed mode, or a leftover file had wider bits
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_key(path, key):
    _, _, serialization, _, _, _ = _crypto()
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), mode=0o600)


# --- tokens -------------------------------------------------------------------------------------------------------
TOKEN_BYTES = 32


def write_token(path, force=False):
    """A new random token (``TOKEN_BYTES`` bytes as hex) in ``path``, mode 0600; returns the path."""
    if not force and os.path.exists(path):
        raise ConfigError("{} exists: use --force to replace it (every host and edge using it needs the new "
                          "one)".format(path))
    assert 2 * TOKEN_BYTES >= MIN_TOKEN_BYTES
    _write(path, (secrets.token_hex(TOKEN_BYTES) + "\n").encode("ascii"), mode=0o600)
    return path


if __name__ == "__main__":
    sys.exit(main())
