"""TLS of the gRPC port over real in-process servers, with a throwaway PKI made by the openssl command line tool:
a TLS client gets answers where a plaintext client or one trusting another CA cannot connect; with mutual TLS a
client without a certificate, or with one from another CA, fails the handshake; admin RPCs accept a verified
client certificate named by --admin-client-name (common name or SAN DNS name) as well as the token, and refuse
other certificates with PERMISSION_DENIED; config and flag checks name the flag to fix; /metrics stays HTTP."""

import argparse
import secrets
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from adalora.cli import build_parser, main
from adalora.config import ConfigError
from adalora.server import tls
from adalora.server.auth import check_admin
from adalora.server.client import AdaLoraClient
from adalora.server.commands import serve
from adalora.server.config import ServerConfig
from adalora.server.errors import PermissionDenied, Unauthenticated
from adalora.server.tls import ClientTLS
from tests.server_setup import ServerThread, status_of, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command line tool to make the throwaway "
                                                        "CA and certificates of these tests")
TOKEN = "tls-admin-token"
ADMIN_NAMES = ("admin-bot", "deployer.example")
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# name -> (signing CA, subject CN, subjectAltName or None, extended key usage)
CERTIFICATES = {
    "server": ("ca", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth"),
    "admin": ("ca", "admin-bot", None, "clientAuth"),                       # admin by its common name
    "deployer": ("ca", "ops-7", "DNS:deployer.example", "clientAuth"),      # admin by a SAN DNS name
    "reader": ("ca", "reader", "DNS:reader.example", "clientAuth"),         # valid, but no admin name
    "stranger": ("other-ca", "admin-bot", None, "clientAuth"),              # an admin name from another CA
}


def openssl(folder: Path, *args: str) -> None:
    subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True, timeout=60)


def new_key_and_request(folder: Path, name: str, cn: str, *extra: str) -> None:
    openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}.key", "-subj", f"/CN={cn}", *extra)


@dataclass
class Pki:
    """A folder of throwaway PEM files: '<name>.pem' certificate and '<name>.key' private key."""

    folder: Path

    def __call__(self, name: str) -> str:
        return str(self.folder / name)

    def client(self, name: str | None, ca: str = "ca") -> ClientTLS:
        """Trusts `ca`; presents certificate `name` (None: none)."""
        if name is None:
            return ClientTLS(ca=self(f"{ca}.pem"))
        return ClientTLS(ca=self(f"{ca}.pem"), cert=self(f"{name}.pem"), key=self(f"{name}.key"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        new_key_and_request(folder, ca, ca, "-x509", "-days", "2", "-out", f"{ca}.pem",
                            "-addext", "basicConstraints=critical,CA:TRUE",
                            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, (ca, cn, san, usage) in CERTIFICATES.items():
        new_key_and_request(folder, name, cn, "-new", "-out", f"{name}.csr")
        extensions = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"] + ([f"subjectAltName={san}"] if san
                                                                                   else [])
        (folder / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return Pki(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tls-model")
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2)}
    return {"base_model": str(write_base(base, root / "base", word_tokenizer())),
            "adapter_dir": str(write_store(root / "adapters", adapters)), "preload": ("a", "b"), "port": 0}


@pytest.fixture(scope="module")
def tls_server(pki, folders):
    """TLS without client certificates, admin RPCs open, /metrics on."""
    server = ServerThread(ServerConfig(**folders, tls_cert=pki("server.pem"), tls_key=pki("server.key"),
                                       metrics_port=0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki, folders):
    """Mutual TLS; admin RPCs for ADMIN_NAMES' certificates or the token."""
    server = ServerThread(ServerConfig(**folders, tls_cert=pki("server.pem"), tls_key=pki("server.key"),
                                       tls_client_ca=pki("ca.pem"), admin_client_names=ADMIN_NAMES, admin_token=TOKEN))
    yield server
    server.stop()


def answers(target: str, client_tls: ClientTLS | None) -> grpc.StatusCode:
    """OK when Generate answers over a channel with `client_tls`, else the call's status."""
    with AdaLoraClient(target, timeout=20, tls=client_tls) as client:
        try:
            reply = client.generate([5, 6, 7], "a", max_new_tokens=3, temperature=0)
        except grpc.RpcError as e:
            return e.code()
    assert len(reply.token_ids) == 3
    return OK


# ---- transport ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # the server certificate's SAN DNS and IP names
def test_a_tls_client_gets_answers_from_a_tls_server(tls_server, pki, host):
    target = f"{host}:{tls_server.port}"
    assert answers(target, pki.client(None)) == OK
    with AdaLoraClient(target, timeout=20, tls=pki.client(None)) as client:
        assert client.health() == "SERVING"
        assert [a.id for a in client.list_adapters().adapters] == ["a", "b"]


# (server, client: (certificate, CA it trusts) or None = plaintext, status of Generate)
CONNECTIONS = [
    ("tls_server", None, UNAVAILABLE),                     # plaintext client, TLS port
    ("tls_server", (None, "other-ca"), UNAVAILABLE),       # does not trust the server's CA
    ("tls_server", ("reader", "ca"), OK),                  # a client certificate nobody asked for is fine
    ("mtls_server", None, UNAVAILABLE),
    ("mtls_server", (None, "ca"), UNAVAILABLE),            # no client certificate: the handshake fails
    ("mtls_server", ("stranger", "ca"), UNAVAILABLE),      # client certificate of another CA
    ("mtls_server", ("reader", "ca"), OK),
    ("mtls_server", ("admin", "ca"), OK),
]


@pytest.mark.parametrize("server_name, client, code", CONNECTIONS,
                         ids=[f"{s}-{c and '-'.join(map(str, c))}" for s, c, _ in CONNECTIONS])
def test_who_can_connect(request, pki, server_name, client, code):
    server = request.getfixturevalue(server_name)
    client_tls = None if client is None else pki.client(client[0], ca=client[1])
    assert answers(f"localhost:{server.port}", client_tls) == code


def test_metrics_stay_plain_http_on_a_tls_server(tls_server, pki):
    assert answers(tls_server.target, pki.client(None)) == OK
    with urllib.request.urlopen(f"http://127.0.0.1:{tls_server.server.metrics_port}/metrics", timeout=20) as reply:
        assert 'adalora_requests_total{adapter="a",rpc="Generate",status="OK"}' in reply.read().decode()


# ---- admin by client certificate ----------------------------------------------------------------------------

# (client certificate, bearer token sent, status of UnloadAdapter / LoadAdapter, fragment of the message)
ADMIN_CASES = [
    ("admin", None, OK, ""),                                                        # CN admin-bot
    ("deployer", None, OK, ""),                                                     # SAN DNS deployer.example
    ("reader", None, grpc.StatusCode.PERMISSION_DENIED, "reader, reader.example, not an --admin-client-name"),
    ("reader", TOKEN, OK, ""),                                                      # the token still works
    ("reader", "wrong", grpc.StatusCode.PERMISSION_DENIED, "not this server's admin token"),
    ("admin", "wrong", OK, ""),                                                     # the certificate suffices
]


@pytest.mark.parametrize("cert, token, code, fragment", ADMIN_CASES)
def test_admin_rpcs_accept_an_admin_certificate_or_the_token(mtls_server, pki, cert, token, code, fragment):
    with AdaLoraClient(mtls_server.target, timeout=20, admin_token=token, tls=pki.client(cert)) as client:
        for call in (lambda: client.unload_adapter("b"), lambda: client.load_adapter("b")):
            if code == OK:
                call()
                continue
            got, details = status_of(call)
            assert (got, fragment in details, "--admin-client-name" in details) == (code, True, True), details
        assert client.get_adapter("b").id == "b"  # open RPCs stay open; a refused call changed nothing
        assert [a.id for a in client.list_adapters().adapters] == ["a", "b"]


@dataclass
class FakeCall:
    """What check_admin reads of a grpc.aio.ServicerContext."""

    metadata: tuple = ()
    auth: dict = field(default_factory=dict)

    def invocation_metadata(self):
        return self.metadata

    def auth_context(self):
        return self.auth


BEARER = (("authorization", f"Bearer {TOKEN}"),)
ADMIN_CERT = {"transport_security_type": [b"ssl"], "x509_common_name": [b"admin-bot"]}
OTHER_CERT = {"transport_security_type": [b"ssl"], "x509_common_name": [b"reader"], "peer_dns": [b"r.example"]}

# (admin_token, admin_client_names, metadata, auth context, error or None, fragment of its message)
RULES = [
    (None, (), (), {}, None, ""),                                                   # nothing configured: open
    (TOKEN, (), BEARER, {}, None, ""),
    (TOKEN, (), (), OTHER_CERT, Unauthenticated, "authorization: Bearer"),          # a cert is no admin credential
    (TOKEN, (), (("authorization", "Bearer x"),), {}, PermissionDenied, "not this server's admin token"),
    (None, ADMIN_NAMES, (), ADMIN_CERT, None, ""),
    (None, ADMIN_NAMES, (), {}, Unauthenticated, "client certificate named admin-bot or deployer.example"),
    (None, ADMIN_NAMES, (), OTHER_CERT, PermissionDenied, "names r.example, reader, not an --admin-client-name"),
    (None, ADMIN_NAMES, BEARER, OTHER_CERT, PermissionDenied, "this server takes no admin token"),
    (TOKEN, ADMIN_NAMES, BEARER, OTHER_CERT, None, ""),
    (TOKEN, ADMIN_NAMES, (), {}, Unauthenticated, "Bearer <token>' (AdaLoraClient(..., admin_token=...)) or connect"),
]


@pytest.mark.parametrize("token, names, metadata, auth, error, fragment", RULES)
def test_check_admin_rules(pki, token, names, metadata, auth, error, fragment):
    extra = {"tls_cert": pki("server.pem"), "tls_key": pki("server.key"), "tls_client_ca": pki("ca.pem")}
    config = ServerConfig(base_model="m", adapter_dir="a", admin_token=token, admin_client_names=names,
                          **(extra if names else {}))
    if error is None:
        check_admin(config, FakeCall(metadata, auth), "LoadAdapter")
        return
    with pytest.raises(error) as raised:
        check_admin(config, FakeCall(metadata, auth), "LoadAdapter")
    assert fragment in str(raised.value) and str(raised.value).startswith("LoadAdapter")


# ---- config, files and flags ----------------------------------------------------------------------------------

# (fields: a name is a file of the PKI folder, "." the folder itself; fragment of the ConfigError)
BAD_CONFIGS = [
    ({"tls_cert": "server.pem", "tls_key": "missing.key"}, "tls_key (--tls-key) {pki}/missing.key: no such file"),
    ({"tls_cert": "server.pem"}, "tls_cert (--tls-cert) and tls_key (--tls-key) go together"),
    ({"tls_key": "server.key"}, "tls_cert (--tls-cert) and tls_key (--tls-key) go together"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca (--tls-client-ca) needs tls_cert and tls_key"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "."}, "--tls-client-ca) {pki}: not a file"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "admin_client_names": ("admin-bot",)},
     "admin_client_names (--admin-client-name) needs tls_client_ca (--tls-client-ca)"),
    ({"admin_client_names": ("admin-bot",)}, "needs tls_client_ca"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "ca.pem", "admin_client_names": "admin-bot"},
     "must be a tuple of non-empty names"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "ca.pem", "admin_client_names": ("",)},
     "must be a tuple of non-empty names"),
]


def in_pki(pki: Pki, fields: dict) -> dict:
    def path(value: str) -> str:
        return str(pki.folder) if value == "." else pki(value)
    return {k: path(v) if k.startswith("tls_") else v for k, v in fields.items()}


@pytest.mark.parametrize("fields, message", BAD_CONFIGS)
def test_bad_tls_configs_are_refused_naming_the_flag(pki, fields, message):
    with pytest.raises(ConfigError) as raised:
        ServerConfig(base_model="m", adapter_dir="a", **in_pki(pki, fields))
    assert message.format(pki=pki.folder) in str(raised.value)


# (fields of a config that validates, flag of the file whose contents are wrong, fragment)
BAD_CONTENTS = [
    ({"tls_cert": "server.key", "tls_key": "server.key"}, "tls_cert (--tls-cert)", "no PEM certificate"),
    ({"tls_cert": "server.pem", "tls_key": "server.pem"}, "tls_key (--tls-key)", "no PEM private key"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "server.ext"}, "--tls-client-ca",
     "no PEM certificate"),
]


@pytest.mark.parametrize("fields, flag, fragment", BAD_CONTENTS)
def test_files_without_pem_blocks_are_refused_when_read(pki, fields, flag, fragment):
    config = ServerConfig(base_model="m", adapter_dir="a", **in_pki(pki, fields))
    with pytest.raises(ConfigError) as raised:
        tls.server_credentials(config)
    assert flag in str(raised.value) and fragment in str(raised.value)


def test_serve_flags(pki):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--base-model", "m", "--adapter-dir", "a", "--tls-cert", pki("server.pem"),
                              "--tls-key", pki("server.key"), "--tls-client-ca", pki("ca.pem"),
                              "--admin-client-name", "admin-bot", "--admin-client-name", "deployer.example"])
    config = serve.config_from(args)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.admin_client_names) == \
        (pki("server.pem"), pki("server.key"), pki("ca.pem"), ADMIN_NAMES)
    plain = serve.config_from(parser.parse_args(["--base-model", "m", "--adapter-dir", "a"]))
    assert (plain.tls_cert, plain.tls_client_ca, plain.admin_client_names) == (None, None, ())
    assert tls.describe(config).startswith("mutual TLS") and tls.describe(plain).startswith("plaintext")


# (server, client flags as PKI file names, exit status, fragment of stdout or stderr)
CLI_CASES = [
    ("tls_server", ["--tls-ca", "ca.pem"], 0, ""),
    ("tls_server", [], 2, "adalora generate: error: UNAVAILABLE"),
    ("tls_server", ["--tls"], 2, "UNAVAILABLE"),                                    # the system roots lack our CA
    ("mtls_server", ["--tls-ca", "ca.pem", "--tls-cert", "reader.pem", "--tls-key", "reader.key"], 0, ""),
    ("mtls_server", ["--tls-ca", "ca.pem"], 2, "UNAVAILABLE"),
    ("mtls_server", ["--tls-ca", "ca.pem", "--tls-cert", "reader.pem"], 2, "give --tls-cert and --tls-key together"),
    ("mtls_server", ["--tls-ca", "missing.pem"], 2, "--tls-ca {pki}/missing.pem: cannot read it"),
]


@pytest.mark.parametrize("server_name, flags, status, fragment", CLI_CASES)
def test_generate_command_tls_flags(request, pki, capsys, server_name, flags, status, fragment):
    server = request.getfixturevalue(server_name)
    with AdaLoraClient(server.target, timeout=20, tls=pki.client("reader")) as client:
        want = client.generate("w5 w6", "a", max_new_tokens=3, temperature=0).text
    flags = [pki(f) if f.endswith((".pem", ".key")) else f for f in flags]
    assert main(["generate", "--server", f"localhost:{server.port}", "--timeout", "20", "--adapter", "a",
                 "--max-new-tokens", "3", *flags, "w5 w6"]) == status
    out, err = capsys.readouterr()
    assert (out, fragment.format(pki=pki.folder) in err) == (want + "\n" if status == 0 else "", True), err


def test_classify_command_has_the_same_connection_flags():
    parser, _ = build_parser()
    args = parser.parse_args(["classify", "--adapter", "x", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key",
                              "c.key", "text"])
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.server, args.timeout) == \
        ("ca.pem", "c.pem", "c.key", "localhost:50051", 60.0)
