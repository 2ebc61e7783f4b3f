"""Sent, once committed, when a patient restricts sharing (a new opposition or mask, a
consent withdrawn): the sharing service revokes what no longer holds. Arguments:
``patient_id`` (the regional patient's primary key), ``directive_id``, ``version``."""

from __future__ import annotations

from django.dispatch import Signal

consent_restricted = Signal()
