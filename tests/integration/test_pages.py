"""The few pages the broker serves so far."""

from __future__ import annotations


def test_the_home_page_lists_the_regions_institutions_in_french(client, region):
    response = client.get("/", HTTP_ACCEPT_LANGUAGE="fr")
    assert response.status_code == 200
    body = response.content.decode()
    assert "CHU de Bellecombe" in body
    assert "Établissements" in body
    assert response["Content-Language"] == "fr"


def test_health_check_answers(client, db):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_unknown_page_is_a_404_page(client, db):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert b"<html" in response.content


def test_the_openapi_schema_generates_without_warnings_and_validates(db, tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yaml"))
    schema = (tmp_path / "s.yaml").read_text()
    assert "InstitutionApiKey" in schema
    assert "/api/v1/manifests/{sop_instance_uid}/kos" in schema
