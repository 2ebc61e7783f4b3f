"""Signals of consent.

``consent_restricting`` is sent *inside* the transaction that records a change that may
narrow sharing (a new opposition or mask, a consent withdrawn or amended): receivers write
in that transaction (the sharing service revokes the grants that no longer hold), so the
revocation commits with the change or not at all. ``consent_restricted`` is sent once that
transaction has committed, for anything that should only follow a committed change.

Arguments: ``patient_id`` (the regional patient's primary key), ``directive_id``,
``version``, and for ``consent_restricting`` ``now``.
"""

from __future__ import annotations

from django.dispatch import Signal

consent_restricting = Signal()
consent_restricted = Signal()
