"""TLS on the proxy port: one context per certificate generation, swapped without dropping anyone.

Settings are modern only: TLS 1.2 and 1.3, forward-secret AEAD suites for
1.2 (1.3's suites are all modern), no compression, no renegotiation, ALPN
``http/1.1`` (the proxy port speaks nothing else).

Certificates reload when their files change, the way cert-manager renews
a Kubernetes Secret (the kubelet swaps a ``..data`` symlink, so both files
change at once) or an operator copies new files in. :meth:`Certificates.refresh`
compares a stat of both files (one a second, from the listener's sweep) and
builds a new context when they differ. Each connection's TLS layer is made
when it arrives (:mod:`.edge`), with the newest context; a connection already
open keeps the context it shook hands with. A new pair
that does not load (a key that does not match, a file half written, one
missing) is refused, logged and counted, and the old pair keeps serving;
it is tried again when the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable

log = logging.getLogger("regiongate")

ALPN = ["http/1.1"]
# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 only.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"

Signature = tuple[tuple[int, int, int, int] | None, ...]


class TlsError(Exception):
    """A certificate and key that cannot serve; the text is one line naming the files."""


def load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key``, or :class:`TlsError` saying why not."""
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as f:
                if not f.read(1):
                    raise TlsError(f"{what} {path}: the file is empty")
        except OSError as e:
            raise TlsError(f"{what} {path}: cannot read it: {e.strerror or e}") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.set_alpn_protocols(ALPN)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(e) else _ssl_reason(e)
        raise TlsError(f"--tls-cert {cert} / --tls-key {key}: {reason}") from None
    except OSError as e:
        raise TlsError(f"--tls-cert {cert} / --tls-key {key}: {e.strerror or e}") from None
    return ctx


def _ssl_reason(e: ssl.SSLError) -> str:
    reason = (e.reason or "").replace("_", " ").lower()
    return f"not a PEM certificate chain and private key ({reason or e})"


def _stat(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows the symlinks, so a swapped ..data is a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Certificates:
    """The certificate generations of one process: the current context and the files it came from."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert, self.key = cert, key
        self._signature = self._stat()
        self.current = load_context(cert, key)  # raises TlsError: a bad pair at startup stops the start
        self.generation = 1
        self.error: str | None = None
        self.on_reload: Callable[[str], None] | None = None

    def _stat(self) -> Signature:
        return (_stat(self.cert), _stat(self.key))

    def refresh(self) -> bool:
        """Load the files again if they changed; True when a new generation is in force."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature  # a refused pair is retried when the files change again
        try:
            ctx = load_context(self.cert, self.key)
        except TlsError as e:
            self.error = str(e)
            log.error("TLS certificate reload refused, the previous certificate keeps serving: %s", e)
            self._count("refused")
            return False
        self.current = ctx
        self.generation += 1
        self.error = None
        log.warning("TLS certificate reloaded from %s (generation %d)", self.cert, self.generation)
        self._count("ok")
        return True

    def _count(self, result: str) -> None:
        if self.on_reload is not None:
            self.on_reload(result)
