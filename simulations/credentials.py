"""Credentials of a TLS deployment with authenticated SuperNodes: a self-signed CA and the
SuperLink's certificate (openssl), one OpenSSH key pair per SuperNode (``cryptography``)."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from simulations.processes import LOOPBACK, ProcessFailed


@dataclass(frozen=True)
class Certificates:
    ca: Path  # what SuperNodes and the flwr CLI trust (--root-certificates, root-certificates)
    cert: Path  # the SuperLink's certificate, signed by the CA
    key: Path  # the SuperLink's private key


def _openssl(*args: str, log_dir: Path) -> None:
    completed = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        log = log_dir / "openssl.log"
        log.write_text(" ".join(["openssl", *args]) + "\n" + completed.stdout + completed.stderr)
        raise ProcessFailed(f"openssl {args[0]} failed (exit {completed.returncode}); see {log}")


def make_certificates(directory: Path, hosts: tuple[str, ...] = (), days: int = 365) -> Certificates:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (the commands of deploy/make-certs.sh).

    The certificate must name every address a client dials: SuperNodes and ``flwr`` dial the
    SuperLink's public name or IP (``hosts``); its own SuperExec dials 127.0.0.1 when it binds
    0.0.0.0, so 127.0.0.1 and localhost are always added.
    """
    hosts = tuple(dict.fromkeys((*hosts, LOOPBACK, "localhost")))
    directory.mkdir(parents=True, exist_ok=True)
    certificates = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    ca_key, request = directory / "ca.key", directory / "server.csr"
    names = ",".join(f"IP:{host}" if _is_ip(host) else f"DNS:{host}" for host in hosts)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-sha384",
        "-days", str(days), "-subj", "/CN=fedunlearn SuperLink CA", "-keyout", str(ca_key), "-out", str(certificates.ca),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        log_dir=directory,
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
        "-subj", f"/CN={hosts[0]}", "-keyout", str(certificates.key), "-out", str(request),
        log_dir=directory,
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(certificates.ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", str(days), "-sha384", "-extfile", str(extensions), "-out", str(certificates.cert),
        log_dir=directory,
    )
    ca_key.chmod(0o600)
    certificates.key.chmod(0o600)
    return certificates


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it.

    ``flower-supernode --auth-supernode-private-key`` reads the private half with
    ``load_ssh_private_key``; ``flwr supernode register`` reads the public half with
    ``load_ssh_public_key`` (a NIST curve is required). The ``cryptography`` package comes with
    flwr, so no ssh-keygen is needed here.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP384R1())
    private_path, public_path = directory / name, directory / f"{name}.pub"
    private_path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return private_path, public_path
