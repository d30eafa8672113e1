"""Throw-away credentials for TLS tests: X.509 certificates and TLS-PSK key files.

Certificates are made with the ``cryptography`` package (paramiko needs it, so it is
always installed). The files follow the layout GnuTLS tools (nbdkit's and libnbd's
``tls-certificates=DIR``, qemu's ``tls-creds-x509,dir=DIR``) expect: ca-cert.pem,
server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
PSK files have psktool's format (``identity:hexkey``), named keys.psk as qemu's
``tls-creds-psk,dir=DIR`` expects.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    directory: str

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def ca(self) -> str:
        return self.path("ca-cert.pem")

    @property
    def server_cert(self) -> str:
        return self.path("server-cert.pem")

    @property
    def server_key(self) -> str:
        return self.path("server-key.pem")

    @property
    def client_cert(self) -> str:
        return self.path("client-cert.pem")

    @property
    def client_key(self) -> str:
        return self.path("client-key.pem")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_certificates(directory: str, ca_name: str = "bmig test CA") -> Certificates:
    """A CA and two certificates it signed, valid for a day, for localhost/127.0.0.1."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    certs = Certificates(directory)
    _write_cert(certs.ca, ca)
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name("localhost" if role == "server"
                                                             else "bmig-client"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_cert(certs.path(f"{role}-cert.pem"), cert)
        _write_key(certs.path(f"{role}-key.pem"), key)
    return certs


def client_directory(directory: str, ca: Certificates,
                     client: Certificates | None = None) -> str:
    """A client's certificates directory: ``ca``'s CA certificate (to check the server)
    and, if ``client`` is given, the client certificate and key that ``client``'s CA
    signed (``ca`` itself, or another CA the server does not trust)."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(ca.ca, os.path.join(directory, "ca-cert.pem"))
    if client is not None:
        shutil.copy(client.client_cert, os.path.join(directory, "client-cert.pem"))
        shutil.copy(client.client_key, os.path.join(directory, "client-key.pem"))
        os.chmod(os.path.join(directory, "client-key.pem"), 0o600)
    return directory


def write_psk_file(directory: str, identity: str, key: bytes | None = None) -> str:
    """``directory``/keys.psk (mode 0600) with one identity; a random 32-byte key unless
    ``key`` is given. Returns the file's path."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "keys.psk")
    with open(path, "w") as f:
        f.write(f"{identity}:{(key or secrets.token_bytes(32)).hex()}\n")
    os.chmod(path, 0o600)
    return path
