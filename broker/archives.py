"""The archive client of a registered institution, built from its archive entry."""

from __future__ import annotations

from django.conf import settings

from broker.dicom.archive import ArchiveClient, ArchiveEndpoint, archive_client
from broker.dicom.network import TLSFiles, tls_client_context
from broker.models import Institution


def institution_endpoint(institution: Institution) -> ArchiveEndpoint:
    """How the broker reaches ``institution``'s archive (DICOM TLS when the broker has
    its certificates: the same files as its server side)."""
    tls = None
    if institution.has_dimse and settings.RELAIS_DICOM_TLS_CERT is not None:
        assert settings.RELAIS_DICOM_TLS_KEY is not None
        assert settings.RELAIS_DICOM_TLS_CA is not None
        tls = tls_client_context(
            TLSFiles(
                settings.RELAIS_DICOM_TLS_CERT,
                settings.RELAIS_DICOM_TLS_KEY,
                settings.RELAIS_DICOM_TLS_CA,
            ),
            ca_certificates=settings.RELAIS_DICOM_TLS_CA,
        )
    return ArchiveEndpoint(
        name=institution.name,
        ae_title=institution.ae_title,
        host=institution.dicom_host,
        port=institution.dicom_port,
        dicomweb_url=institution.dicomweb_url,
        calling_ae_title=settings.RELAIS_DICOM_AE_TITLE,
        tls=tls,
        https_ca=str(settings.RELAIS_ARCHIVE_HTTPS_CA or ""),
        timeout=settings.RELAIS_DICOM_TIMEOUT,
    )


def institution_archive(institution: Institution, transport: str | None = None) -> ArchiveClient:
    """A client of ``institution``'s archive over ``transport`` (default: its own choice).

    Raises ValueError when that transport is not configured for it.
    """
    chosen = transport or institution.transport
    if chosen not in ("dicomweb", "dimse"):
        raise ValueError(f"unknown archive transport {chosen!r}: dicomweb or dimse")
    return archive_client(institution_endpoint(institution), chosen)  # type: ignore[arg-type]
