"""The database refuses UPDATE and DELETE of audit events (and TRUNCATE of a non-empty trail).

SQLite: BEFORE UPDATE / BEFORE DELETE triggers that RAISE(ABORT). PostgreSQL: a plpgsql
function raising integrity_constraint_violation, from a BEFORE UPDATE OR DELETE row
trigger and a BEFORE TRUNCATE statement trigger. The SQL lives in audit.triggers.
"""

from django.db import migrations

from audit.triggers import install_append_only_triggers, remove_append_only_triggers


def install(apps, schema_editor):
    install_append_only_triggers(schema_editor.connection)


def remove(apps, schema_editor):
    remove_append_only_triggers(schema_editor.connection)


class Migration(migrations.Migration):

    dependencies = [
        ("audit", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(install, remove, elidable=False),
    ]
