"""Real Orthanc archives for tests: started with their own config, ports and storage.

`start_orthanc(workdir, aet=..., modalities=...)` runs `/usr/sbin/Orthanc` (1.10.1, with the
DICOMweb plugin 1.7 only) on free ports, waits until its REST API answers and returns an
`OrthancArchive` to load, query and stop it. See /work/shared/PEERS.md for the traps this
works around: Nagle (TCP_NODELAY=1 in Orthanc's environment), gzip on DICOM payloads
(HttpCompressionEnabled off, and the client asks for `identity`), and Orthanc listening on all
interfaces (remote access refused, modality hosts checked).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx

ORTHANC_BINARY: Final = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN: Final = Path("/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")
STARTUP_TIMEOUT_SECONDS: Final = 20.0
STOP_TIMEOUT_SECONDS: Final = 10.0
LOG_TAIL_LINES: Final = 30

# Orthanc's own words when a port is taken (DCMTK for DICOM, CivetWeb for HTTP).
_PORT_TAKEN_MARKERS: Final = (
    "Address already in use",
    "cannot bind",
    "Cannot bind",
    "The TCP port of the DICOM server is privileged or already in use",
    "The TCP port of the HTTP server is privileged or already in use",
)


class OrthancError(RuntimeError):
    """Orthanc did not start, or refused a request."""


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    missing = [str(path) for path in (ORTHANC_BINARY, DICOMWEB_PLUGIN) if not path.is_file()]
    if not missing:
        return None
    return (
        f"Orthanc is not installed ({', '.join(missing)} missing): "
        "apt-get install -y orthanc orthanc-dicomweb"
    )


def http_client(base_url: str, *, timeout: float = 30.0) -> httpx.Client:
    """An httpx client for an archive: no proxy from the environment, no gzip, keep-alive."""
    return httpx.Client(
        base_url=base_url,
        trust_env=False,
        timeout=timeout,
        headers={"Accept-Encoding": "identity"},
    )


@dataclass
class OrthancArchive:
    """A running Orthanc; `stop()` it (the fixtures do)."""

    aet: str
    http_port: int
    dicom_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    _log_file: IO[bytes] = field(repr=False)
    _client: httpx.Client | None = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def http(self) -> httpx.Client:
        """The archive's own keep-alive client (base URL set); closed by `stop()`."""
        if self._client is None:
            self._client = http_client(self.base_url)
        return self._client

    def upload(self, data: bytes) -> None:
        """Store one Part 10 instance through `POST /instances`."""
        _store(self.http, data)

    def upload_many(self, items: Iterable[bytes]) -> int:
        """Store instances one after the other on one connection; returns how many."""
        count = 0
        for data in items:
            _store(self.http, data)
            count += 1
        return count

    def delete_series(self, series_instance_uid: str) -> None:
        self._delete("Series", series_instance_uid)

    def delete_study(self, study_instance_uid: str) -> None:
        self._delete("Study", study_instance_uid)

    def study_count(self) -> int:
        return int(self.statistics()["CountStudies"])

    def statistics(self) -> dict[str, Any]:
        """`GET /statistics`: CountPatients, CountStudies, CountSeries, CountInstances..."""
        response = self.http.get("/statistics")
        response.raise_for_status()
        statistics: dict[str, Any] = response.json()
        return statistics

    def lookup(self, dicom_uid: str, resource_type: str) -> list[str]:
        """Orthanc IDs of the resources of this type with this DICOM UID (`/tools/lookup`).

        Several when the same UID was stored under several Patient IDs (PEERS.md trap 5).
        """
        response = self.http.post("/tools/lookup", content=dicom_uid.encode("ascii"))
        response.raise_for_status()
        return [match["ID"] for match in response.json() if match["Type"] == resource_type]

    def terminate(self) -> None:
        """Ask Orthanc to stop (SIGTERM to its PID) without waiting: it takes ~3.5 s.

        Sent once only: a second SIGTERM makes Orthanc quit at once, skipping its shutdown.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        if not self._terminated and self.process.poll() is None:
            self.process.terminate()
            self._terminated = True

    def stop(self, *, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Terminate Orthanc, wait for it, kill it if it lingers; close the log."""
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()

    def _delete(self, resource_type: str, dicom_uid: str) -> None:
        orthanc_ids = self.lookup(dicom_uid, resource_type)
        if not orthanc_ids:
            raise OrthancError(f"{self.aet}: no {resource_type.lower()} {dicom_uid}")
        path = {"Study": "studies", "Series": "series"}[resource_type]
        for orthanc_id in orthanc_ids:
            self.http.delete(f"/{path}/{orthanc_id}").raise_for_status()


def start_orthanc(
    workdir: Path,
    *,
    aet: str,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
) -> OrthancArchive:
    """Start an empty Orthanc in `workdir` and wait until its REST API answers.

    `modalities` maps a name to (AET, host, port): each may echo, find, get, move and store.
    Ports are free ones picked by the system; if one was taken meanwhile, a second attempt
    takes new ones.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _start_once(workdir, aet=aet, modalities=modalities or {})
    except _PortTakenError:
        return _start_once(workdir, aet=aet, modalities=modalities or {})


def free_port() -> int:
    """A TCP port free on every interface (Orthanc binds them all), picked by the system."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port: int = probe.getsockname()[1]
        return port


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
) -> dict[str, Any]:
    """The JSON configuration of a test archive."""
    return {
        "Name": aet,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "HttpPort": http_port,
        "HttpCompressionEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {
            name: {
                "AET": modality_aet,
                "Host": host,
                "Port": port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowGet": True,
                "AllowMove": True,
                "AllowStore": True,
            }
            for name, (modality_aet, host, port) in modalities.items()
        },
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "StableAge": 1,
        "MaximumPduLength": 65536,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "LogExportedResources": False,
    }


class _PortTakenError(OrthancError):
    pass


def _start_once(
    workdir: Path, *, aet: str, modalities: Mapping[str, tuple[str, str, int]]
) -> OrthancArchive:
    http_port = free_port()
    dicom_port = free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = orthanc_config(
        workdir, aet=aet, http_port=http_port, dicom_port=dicom_port, modalities=modalities
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_file = (workdir / "orthanc.log").open("ab")
    process = subprocess.Popen(
        [str(ORTHANC_BINARY), str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
        cwd=workdir,
    )
    archive = OrthancArchive(
        aet=aet,
        http_port=http_port,
        dicom_port=dicom_port,
        workdir=workdir,
        process=process,
        _log_file=log_file,
    )
    try:
        _wait_until_ready(archive)
    except BaseException:
        archive.stop()
        raise
    return archive


def _wait_until_ready(archive: OrthancArchive) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with http_client(archive.base_url, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if archive.process.poll() is not None:
                tail = _log_tail(archive.log_path)
                error = _PortTakenError if _port_taken(tail) else OrthancError
                raise error(
                    f"Orthanc {archive.aet} exited with status {archive.process.returncode} "
                    f"before answering; last lines of {archive.log_path}:\n{tail}"
                )
            try:
                if client.get("/system").status_code == httpx.codes.OK:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise OrthancError(
        f"Orthanc {archive.aet} did not answer GET /system on port {archive.http_port} "
        f"within {STARTUP_TIMEOUT_SECONDS:.0f} s; last lines of {archive.log_path}:\n"
        f"{_log_tail(archive.log_path)}"
    )


def _store(client: httpx.Client, data: bytes) -> None:
    response = client.post(
        "/instances", content=data, headers={"Content-Type": "application/dicom"}
    )
    if response.status_code != httpx.codes.OK:
        raise OrthancError(f"POST /instances answered {response.status_code}: {response.text}")
    status = response.json().get("Status")
    if status not in {"Success", "AlreadyStored"}:
        raise OrthancError(f"POST /instances stored nothing: {response.text}")


def _log_tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _port_taken(log_tail: str) -> bool:
    return any(marker in log_tail for marker in _PORT_TAKEN_MARKERS)
