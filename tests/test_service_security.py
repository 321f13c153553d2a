"""TLS, mutual TLS and bearer tokens on a real loopback service: accepted and refused cases."""

from __future__ import annotations

import pytest

from edgeexit.errors import ConfigError, PeerUnavailable
from edgeexit.runtime import codec
from edgeexit.runtime.client import ClientOptions, InferenceClient
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.security import read_token_file


def _offload(target: str, options: ClientOptions, x, name: str) -> dict:
    with InferenceClient(target, options) as client:
        return client.infer(name, "boundary0", codec.encode(x), timeout=5)


@pytest.fixture
def model(service_bundle) -> str:
    from edgeexit.bundle import Bundle

    return f"{Bundle.load(service_bundle).name}@0"


def test_token_accepted_refused_missing(serve, boundary_batch, model):
    server = serve(ServerOptions(token="s3cret"))
    x = boundary_batch(0, 1)
    assert _offload(server.target, ClientOptions(token="s3cret"), x, model)
    with pytest.raises(PeerUnavailable, match="UNAUTHENTICATED.*wrong bearer token"):
        _offload(server.target, ClientOptions(token="guess"), x, model)
    with pytest.raises(PeerUnavailable, match="UNAUTHENTICATED.*missing"):
        _offload(server.target, ClientOptions(), x, model)
    assert InferenceClient(server.target, ClientOptions(token="s3cret")).ready()
    assert not InferenceClient(server.target).ready()  # ServerReady needs the token too
    assert server.metrics.value("edgeexit_requests_total", {"model": model, "code": "OK"}) == 1


def test_tls_accepted_and_refused(serve, pki, boundary_batch, model):
    server = serve(ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    x = boundary_batch(0, 1)
    assert _offload(server.target, ClientOptions(tls_ca=pki["ca"]), x, model)
    with pytest.raises(PeerUnavailable):  # a CA that did not sign the server's certificate
        _offload(server.target, ClientOptions(tls_ca=pki["rogue_ca"]), x, model)
    with pytest.raises(PeerUnavailable):  # plaintext to a TLS port
        _offload(server.target, ClientOptions(), x, model)


def test_mutual_tls(serve, pki, boundary_batch, model):
    server = serve(ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                                 tls_client_ca=pki["ca"], token="t"))
    x = boundary_batch(0, 1)
    good = ClientOptions(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"], token="t")
    assert _offload(server.target, good, x, model)
    with pytest.raises(PeerUnavailable):  # no client certificate
        _offload(server.target, ClientOptions(tls_ca=pki["ca"], token="t"), x, model)
    rogue = ClientOptions(tls_ca=pki["ca"], tls_cert=pki["rogue_client_cert"], tls_key=pki["rogue_client_key"],
                          token="t")
    with pytest.raises(PeerUnavailable):  # a client certificate from another CA
        _offload(server.target, rogue, x, model)


def test_bad_security_options_are_config_errors(tmp_path, pki):
    with pytest.raises(ConfigError, match="both"):
        build_server([], ServerOptions(tls_cert=pki["server_cert"]))
    with pytest.raises(ConfigError, match="does not exist"):
        build_server([], ServerOptions(tls_cert=str(tmp_path / "x.pem"), tls_key=pki["server_key"]))
    not_pem = tmp_path / "bad.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM"):
        build_server([], ServerOptions(tls_cert=str(not_pem), tls_key=pki["server_key"]))
    with pytest.raises(ConfigError, match="both a client certificate and its key"):
        InferenceClient("127.0.0.1:1", ClientOptions(tls_ca=pki["ca"], tls_cert=pki["client_cert"]))
    empty = tmp_path / "token"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="one token"):
        read_token_file(empty)
    empty.write_text(" abc \n")
    assert read_token_file(empty) == "abc"
