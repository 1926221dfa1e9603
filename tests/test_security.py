"""Bearer tokens and TLS on the public API, mutual TLS between orchestrator and target,
with certificates the test makes itself."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.client import build_request, connect, generate
from specserve.launcher import free_port
from specserve.v1 import model_service_pb2, target_pb2_grpc

TOKEN = "s3cret-token-for-tests"


def _issue(directory: Path, name: str, ca: tuple | None = None, is_ca: bool = False) -> tuple:
    """Writes name.pem and name.key; (certificate, key). Signed by `ca`, else self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = ca if ca else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return certificate, key


@pytest.fixture(scope="module")
def secured_stack(tiny_target_dir, tmp_path_factory):
    """A target speaking mutual TLS, an orchestrator reaching it with a client certificate and
    serving TLS with bearer tokens; (address, certificate directory, log directory)."""
    pki = tmp_path_factory.mktemp("pki")
    ca = _issue(pki, "ca", is_ca=True)
    for name in ("target", "orchestrator", "orchestrator-client"):
        _issue(pki, name, ca=ca)
    (pki / "tokens").write_text(f"# tokens, one per line\n{TOKEN}\nanother-token\n")
    logs = tmp_path_factory.mktemp("secured-logs")
    target_port, port = free_port(), free_port()
    processes = [
        subprocess.Popen([sys.executable, "-m", "target_service", "--model", str(tiny_target_dir), "--port", str(target_port),
                          "--threads", "1", "--tls-cert", str(pki / "target.pem"), "--tls-key", str(pki / "target.key"),
                          "--tls-client-ca", str(pki / "ca.pem")],
                         stdout=open(logs / "target.log", "wb"), stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "orchestrator", "--port", str(port), "--target", f"127.0.0.1:{target_port}",
                          "--draft", "", "--tokenizer", str(tiny_target_dir),
                          "--tls-cert", str(pki / "orchestrator.pem"), "--tls-key", str(pki / "orchestrator.key"),
                          "--auth-token-file", str(pki / "tokens"), "--upstream-ca", str(pki / "ca.pem"),
                          "--upstream-cert", str(pki / "orchestrator-client.pem"),
                          "--upstream-key", str(pki / "orchestrator-client.key")],
                         stdout=open(logs / "orchestrator.log", "wb"), stderr=subprocess.STDOUT),
    ]
    try:
        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        _wait_secure_serving(f"127.0.0.1:{port}", credentials, processes)
        yield f"127.0.0.1:{port}", f"127.0.0.1:{target_port}", pki, logs
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


def _wait_secure_serving(address: str, credentials, processes, timeout_s: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in processes), "a service exited"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} did not become SERVING")


def _call(address: str, pki: Path, token: str | None):
    channel, stub = connect(address, tls_ca=str(pki / "ca.pem"))
    with channel:
        return generate(stub, build_request(prompt="Hello there", max_new_tokens=8, method="autoregressive"),
                        timeout_s=60, token=token)


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN[:-1], TOKEN + "x", ""])
def test_without_a_valid_token_every_call_is_unauthenticated(secured_stack, token):
    address, _, pki, _ = secured_stack
    with pytest.raises(grpc.RpcError) as caught:
        _call(address, pki, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_valid_token_over_tls_generates_and_is_never_logged(secured_stack):
    address, _, pki, logs = secured_stack
    for token in (TOKEN, "another-token"):
        result = _call(address, pki, token)
        assert len(result.token_ids) == 8
    assert TOKEN not in (logs / "orchestrator.log").read_text()


def test_health_and_reflection_need_no_token(secured_stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address, _, pki, _ = secured_stack
    with grpc.secure_channel(address, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert "specserve.v1.Orchestrator" in names


def test_plaintext_clients_and_clients_without_a_certificate_are_refused(secured_stack):
    address, target_address, pki, _ = secured_stack
    channel, stub = connect(address)  # plaintext against a TLS port
    with channel, pytest.raises(grpc.RpcError) as caught:
        generate(stub, build_request(prompt="hi", max_new_tokens=2), timeout_s=10, token=TOKEN)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The target wants a client certificate signed by the CA: server-checked TLS alone is refused.
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(target_address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            target_pb2_grpc.TargetServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # With the orchestrator's client certificate it answers.
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "orchestrator-client.key").read_bytes(),
                                               (pki / "orchestrator-client.pem").read_bytes())
    with grpc.secure_channel(target_address, credentials) as channel:
        info = target_pb2_grpc.TargetServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10)
    assert info.vocab_size > 0


def test_the_gateway_passes_the_clients_key_on_over_tls(secured_stack, tmp_path):
    """An OpenAI client's api_key is the bearer token the orchestrator checks; the gateway reaches
    the orchestrator over TLS."""
    import openai

    from specserve.launcher import wait_http_ok

    address, _, pki, _ = secured_stack
    http_port = free_port()
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "specserve.gateway", "--port", str(http_port), "--orchestrator", address,
                                    "--orchestrator-tls-ca", str(pki / "ca.pem"), "--served-model-name", "tiny"],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", 60, gateway)  # health needs no token
        for key in ("wrong-token", TOKEN):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0)
            if key != TOKEN:
                with pytest.raises(openai.AuthenticationError) as error:
                    client.completions.create(model="tiny", prompt="Hello there", max_tokens=4)
                assert error.value.status_code == 401 and TOKEN not in str(error.value.body)
            else:
                reply = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0)
                assert reply.usage.completion_tokens == 4
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)
