"""A real OHIF viewer (v3, its published build) in Debian's Chromium shows a shared study
through the gateway, configured as docs/ohif.md says: the viewer on its own origin, the
broker allowing it (CORS), the retrieval token as the Bearer of every request."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from audit.events import EventCode
from audit.models import AuditEvent
from tests.integration.gunicorn_harness import GunicornHarness, gunicorn_serving
from tests.peers.fixtures import require
from tests.peers.ohif import CHROMIUM, browser_missing, ohif_dist

pytestmark = pytest.mark.django_db(transaction=True)

# The data source of docs/ohif.md (its roots set to the broker under test).
DATA_SOURCE = {
    "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
    "sourceName": "relais",
    "configuration": {
        "friendlyName": "Relais (région)",
        "name": "relais",
        "qidoSupportsIncludeField": False,
        "supportsReject": False,
        "supportsFuzzyMatching": False,
        "supportsWildcard": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "staticWado": False,
        "bulkDataURI": {"enabled": False},
        "omitQuotationForMultipartRequest": True,
    },
}


def app_config(dicomweb: str) -> str:
    source = json.loads(json.dumps(DATA_SOURCE))
    source["configuration"] |= {"qidoRoot": dicomweb, "wadoRoot": dicomweb, "wadoUriRoot": dicomweb}
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": False,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "defaultDataSourceName": "relais",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config)};\n"


class _ViewerFiles(http.server.SimpleHTTPRequestHandler):
    """OHIF's build, as a static host serves a single-page application: a path that is not a
    file is the application (``index.html``); ``app-config.js`` is ours."""

    config = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            body = self.config.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def viewer_serving(dist: Path, dicomweb: str) -> Iterator[str]:
    handler = type("ViewerFiles", (_ViewerFiles,), {"config": app_config(dicomweb)})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(dist))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def broker() -> Iterator[GunicornHarness]:
    from broker.wsgi import application

    with gunicorn_serving(application) as harness:
        yield harness


def test_ohif_shows_a_shared_study_through_the_gateway(shared, broker, settings):
    require(browser_missing())
    from playwright.sync_api import sync_playwright

    dist = ohif_dist()
    assert dist is not None
    study = shared["study"]
    gateway = f"{broker.url}/dicomweb"
    with viewer_serving(dist, gateway) as viewer, sync_playwright() as playwright:
        settings.CORS_ALLOWED_ORIGINS = [viewer]
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            answers: list[tuple[str, int, str]] = []
            page.on(
                "response",
                lambda r: (
                    answers.append((r.url, r.status, r.request.headers.get("authorization", "")))
                    if r.url.startswith(gateway)
                    else None
                ),
            )
            failures: list[str] = []
            page.on("pageerror", lambda error: failures.append(str(error)))
            page.goto(
                f"{viewer}/viewer?StudyInstanceUIDs={study.study_instance_uid}"
                f"&token={shared['token']}"
            )
            deadline = time.monotonic() + 90
            while not any("/frames/" in url and status == 200 for url, status, _ in answers):
                assert time.monotonic() < deadline, f"no frame shown; gateway answers: {answers}"
                page.wait_for_timeout(250)
            page.wait_for_timeout(1000)  # what else the viewer asks for the first image
            if shot := os.environ.get("RELAIS_OHIF_SCREENSHOT"):  # to look at what it showed
                page.screenshot(path=shot)
            assert "token=" not in page.url  # OHIF took it out of the address
            # the study browser lists the study's series, from the registry and the metadata
            for number in range(1, len(study.series_uids) + 1):
                assert page.get_by_text(f"{study.description} S{number}").count()
        finally:
            browser.close()
    assert answers
    assert all(auth == f"Bearer {shared['token']}" for _, _, auth in answers), answers
    assert all(status == 200 for _, status, _ in answers), answers
    asked = {url.split("?")[0].removeprefix(gateway) for url, _, _ in answers}
    study_path = f"/studies/{study.study_instance_uid}"
    assert any(path.startswith(study_path) and path.endswith("/metadata") for path in asked)
    assert AuditEvent.objects.filter(code=EventCode.GATEWAY_METADATA).exists()
    transfers = AuditEvent.objects.filter(code=EventCode.TRANSFER_END)
    frames = [e for e in transfers if "/frames/" in (e.details.get("resource") or "")]
    assert frames
    assert not failures, failures
    print("OHIF asked the gateway:", *sorted(asked), sep="\n  ")
