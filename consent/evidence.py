"""Consent evidence at rest: AES-256-GCM, the document's SHA-256 bound as associated data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The formats a scanned, signed form comes in, by their first bytes.
SIGNATURES: dict[str, bytes] = {
    "application/pdf": b"%PDF-",
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
}


class EvidenceRefused(ValueError):
    pass


@dataclass(frozen=True)
class Sealed:
    sha256: str
    content_type: str
    size: int
    nonce: bytes
    ciphertext: bytes


def sniff(document: bytes) -> str:
    """The document's type, from its content (never from what the client says)."""
    for content_type, signature in SIGNATURES.items():
        if document.startswith(signature):
            return content_type
    raise EvidenceRefused("the evidence is not a PDF, PNG or JPEG document")


def seal(document: bytes, *, key_path: Path, max_bytes: int) -> Sealed:
    if not document:
        raise EvidenceRefused("the evidence is empty")
    if len(document) > max_bytes:
        raise EvidenceRefused(f"the evidence is larger than {max_bytes} bytes")
    content_type = sniff(document)
    digest = hashlib.sha256(document).hexdigest()
    nonce = os.urandom(12)
    ciphertext = AESGCM(key_path.read_bytes()).encrypt(nonce, document, digest.encode())
    return Sealed(digest, content_type, len(document), nonce, ciphertext)


def unseal(sealed: Sealed, *, key_path: Path) -> bytes:
    """The document in clear; raises if the ciphertext, its hash or the key do not match."""
    document = AESGCM(key_path.read_bytes()).decrypt(
        sealed.nonce, sealed.ciphertext, sealed.sha256.encode()
    )
    if hashlib.sha256(document).hexdigest() != sealed.sha256:  # pragma: no cover - GCM checks
        raise EvidenceRefused("the evidence does not match its hash")
    return document
