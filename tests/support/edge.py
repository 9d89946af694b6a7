"""Helpers for the edge tests: a local CA and its leaf certificates, Kubernetes-style secret
directories, and HAProxy in front of the gateway (all on loopback, in the test's tmp dir)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support.processes import free_port


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    serial: int

    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


class LocalCA:
    """A throwaway CA (P-256) that signs leaf certificates for 127.0.0.1 and localhost."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        where.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = where / "ca.pem", where / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(self.key), "-out", str(self.cert), "-days", "2", "-subj", "/CN=regiongate test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def leaf(self, name: str, serial: int) -> Leaf:
        key, csr, cert = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.pem"
        ext = self.dir / f"{name}.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(serial), "-days", "2", "-out", str(cert), "-extfile", str(ext),
        )  # fmt: skip
        return Leaf(cert, key, serial)


class SecretDir:
    """A directory laid out as the kubelet mounts a Secret: tls.crt -> ..data/tls.crt, ..data -> ..<version>.

    :meth:`publish` swaps ``..data`` atomically (a rename of a new symlink over it), as the kubelet does.
    """

    def __init__(self, where: Path) -> None:
        self.dir = where
        where.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self.cert, self.key = where / "tls.crt", where / "tls.key"

    def publish(self, cert: bytes, key: bytes) -> None:
        self._n += 1
        version = f"..2026_{self._n:02d}"
        (self.dir / version).mkdir()
        (self.dir / version / "tls.crt").write_bytes(cert)
        (self.dir / version / "tls.key").write_bytes(key)
        tmp = self.dir / "..data_tmp"
        os.symlink(version, tmp)
        os.rename(tmp, self.dir / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.dir / name).is_symlink():
                os.symlink(f"..data/{name}", self.dir / name)

    def publish_leaf(self, leaf: Leaf) -> None:
        self.publish(leaf.cert.read_bytes(), leaf.key.read_bytes())


def client_context(ca: LocalCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def haproxy_bin() -> str | None:
    return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None


@contextlib.contextmanager
def run_haproxy(tmp: Path, backend_port: int, send: str) -> Iterator[int]:
    """HAProxy in TCP mode on a free loopback port, sending ``send`` (send-proxy, send-proxy-v2) to the backend."""
    binary = haproxy_bin()
    assert binary, "haproxy is not installed (scripts/test installs it from Debian)"
    port = free_port()
    cfg = tmp / f"haproxy-{port}.cfg"
    cfg.write_text(
        f"""global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{port}
    default_backend gateway
backend gateway
    server gw 127.0.0.1:{backend_port} {send}
"""
    )
    subprocess.run([binary, "-c", "-f", str(cfg)], check=True, capture_output=True)
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
