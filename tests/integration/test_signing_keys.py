"""Token signing keys: rotation, the JWKS endpoint, old tokens verifying until they expire."""

from __future__ import annotations

import datetime as dt
import os
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings

from audit.events import EventCode
from audit.models import AuditEvent
from broker.keys import signing_keys
from sharing.keystore import current_signing_key, verification_keys
from sharing.tokens import Grant, TokenUnknownKey, token_issue, token_verify

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
GRANT = Grant("10000000001", ("1.2.3",), "avis", "ticket-1", NOW + dt.timedelta(hours=1))


@pytest.fixture
def data_dir(tmp_path, settings):
    settings.DATA_DIR = tmp_path
    return tmp_path


def _token(key):
    token, _ = token_issue(key=key, grant=GRANT, issuer="relais", audience="gateway", now=NOW)
    return token


def _verify(token):
    return token_verify(
        token, public_keys=verification_keys(), issuer="relais", audience="gateway", now=NOW
    )


@pytest.mark.django_db
def test_rotation_makes_a_new_key_current_and_the_old_one_still_verifies(data_dir, client):
    before = current_signing_key()
    old_token = _token(before)
    out = StringIO()
    call_command("rotate_signing_key", stdout=out)
    after = current_signing_key()
    assert after.kid != before.kid
    assert f"Signing key {after.kid} is current; {before.kid} is retired." in out.getvalue()
    # The old key still verifies what it signed; the new key signs from now on.
    assert _verify(old_token).ticket == "ticket-1"
    assert _verify(_token(after)).ticket == "ticket-1"
    published = client.get("/.well-known/jwks.json")
    assert published.status_code == 200
    assert published["Cache-Control"] == "public, max-age=60"
    assert {k["kid"] for k in published.json()["keys"]} == {before.kid, after.kid}
    (event,) = AuditEvent.objects.filter(code=EventCode.SIGNING_KEY_ROTATE)
    assert event.details == {"new": after.kid, "retired": before.kid}


@pytest.mark.django_db
def test_a_key_retired_longer_than_a_token_lives_verifies_nothing(data_dir, client):
    old = current_signing_key()
    old_token = _token(old)
    call_command("rotate_signing_key", stdout=StringIO())
    marker = data_dir / "signing-keys" / f"{old.kid}.retired"
    marker.write_text(str(time.time() - 16 * 60 - 60))  # retired 17 minutes ago
    with override_settings(RELAIS_TOKEN_LIFETIME_SECONDS=900):
        with pytest.raises(TokenUnknownKey):
            _verify(old_token)
        kids = {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {current_signing_key().kid}
    # The key file stays (nothing is deleted); only its publication ends.
    assert old.kid in {k.kid for k in signing_keys(data_dir)}


def test_rotation_switches_current_atomically(tmp_path):
    from broker.keys import load_or_create_signing_key, signing_key_rotate

    load_or_create_signing_key(tmp_path)
    kids = {signing_key_rotate(tmp_path) for _ in range(3)}
    assert len(kids) == 3
    keys = signing_keys(tmp_path)
    assert keys[0].kid in kids
    assert keys[0].retired_at is None
    assert sum(k.retired_at is None for k in keys) == 1
    assert not [p for p in os.listdir(tmp_path / "signing-keys") if p.startswith(".current")]
