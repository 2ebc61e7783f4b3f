"""Request body parsers."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers


class DicomParser(parsers.BaseParser):
    """``application/dicom``: a DICOM Part 10 file, read whole (bounded by the settings)."""

    media_type = "application/dicom"

    def parse(
        self, stream: Any, media_type: str | None = None, parser_context: Any = None
    ) -> bytes:
        # One byte past the limit is enough for the service to refuse (and audit) it.
        limit = settings.RELAIS_MAX_MANIFEST_BYTES
        data = stream.read(limit + 1) if stream is not None else b""
        if not data:
            raise exceptions.ParseError("The body is empty: send a DICOM file")
        return bytes(data)
