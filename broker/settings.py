"""Relais settings: one module, every value from the environment, typed, failing loudly.

Nothing here depends on where it runs except through environment variables; secrets
are generated on first run into ``RELAIS_DATA_DIR`` (default ``var/``), never committed.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from environs import Env, EnvError
from marshmallow.validate import OneOf, Range

from broker.keys import (
    load_or_create_evidence_key,
    load_or_create_secret_key,
    load_or_create_signing_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent

env = Env(eager=False)
env.read_env(BASE_DIR / ".env", recurse=False)

DATA_DIR: Path = env.path("RELAIS_DATA_DIR", BASE_DIR / "var").resolve()
DEBUG: bool = env.bool("DEBUG", False)
SECRET_KEY: str = env.str("SECRET_KEY", "") or ""
ALLOWED_HOSTS: list[str] = env.list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", [])
_DATABASE_URL: str = env.str("DATABASE_URL", "") or ""
CONN_MAX_AGE: int = env.int("CONN_MAX_AGE", 600, validate=Range(min=0))
LANGUAGE_CODE: str = env.str("LANGUAGE_CODE", "fr")
TIME_ZONE: str = env.str("TIME_ZONE", "Europe/Paris")

# The region's settings.
RELAIS_REGION_NAME: str = env.str("RELAIS_REGION_NAME", "Région de démonstration")
RELAIS_MAX_MANIFEST_BYTES: int = env.int(
    "RELAIS_MAX_MANIFEST_BYTES", 8 * 1024 * 1024, validate=Range(min=1)
)
RELAIS_DICOM_AE_TITLE: str = env.str("RELAIS_DICOM_AE_TITLE", "RELAIS")
RELAIS_DICOM_PORT: int = env.int("RELAIS_DICOM_PORT", 11112, validate=Range(min=1, max=65535))
# The address the DICOM server listens on: loopback by default, "0.0.0.0" to serve a network.
RELAIS_DICOM_BIND: str = env.str("RELAIS_DICOM_BIND", "127.0.0.1")
RELAIS_DICOM_MAX_ASSOCIATIONS: int = env.int(
    "RELAIS_DICOM_MAX_ASSOCIATIONS", 32, validate=Range(min=1, max=1000)
)
RELAIS_DICOM_TIMEOUT: float = env.float("RELAIS_DICOM_TIMEOUT", 30.0, validate=Range(min=1))
# DICOM over TLS (PS3.15 B.1): the server's certificate and key, and the CA that signs the
# certificates of the archives allowed to associate (PEM files). All three, or none.
RELAIS_DICOM_TLS_CERT: Path | None = env.path("RELAIS_DICOM_TLS_CERT", None)
RELAIS_DICOM_TLS_KEY: Path | None = env.path("RELAIS_DICOM_TLS_KEY", None)
RELAIS_DICOM_TLS_CA: Path | None = env.path("RELAIS_DICOM_TLS_CA", None)
# CAs trusted for the archives' DICOMweb over HTTPS besides the system's (a PEM file: a
# region's or a hospital's own PKI).
RELAIS_ARCHIVE_HTTPS_CA: Path | None = env.path("RELAIS_ARCHIVE_HTTPS_CA", None)
RELAIS_HTTPS: bool = env.bool("RELAIS_HTTPS", False)
# Retrieval tokens: their lifetime at most (a grant, a shift or an emergency may end sooner).
RELAIS_TOKEN_LIFETIME_SECONDS: int = env.int(
    "RELAIS_TOKEN_LIFETIME_SECONDS", 900, validate=Range(min=30, max=3600)
)
# Who signs tokens (iss) and who honours them (aud: the retrieval gateway).
RELAIS_TOKEN_ISSUER: str = env.str("RELAIS_TOKEN_ISSUER", "urn:relais:broker")
RELAIS_TOKEN_AUDIENCE: str = env.str("RELAIS_TOKEN_AUDIENCE", "urn:relais:gateway")
# How stale a process's copy of the revocation list may be (seconds; revocation reaches
# every process within this delay).
RELAIS_REVOCATION_POLL_SECONDS: float = env.float(
    "RELAIS_REVOCATION_POLL_SECONDS", 0.5, validate=Range(min=0, max=1)
)
# Sharing: how long an approved request (avis, treatment) grants access, how long a request
# may wait for its approver, and whether the care team is approved by the policy itself.
RELAIS_GRANT_DAYS: int = env.int("RELAIS_GRANT_DAYS", 14, validate=Range(min=1, max=365))
RELAIS_REQUEST_PENDING_DAYS: int = env.int(
    "RELAIS_REQUEST_PENDING_DAYS", 14, validate=Range(min=1, max=365)
)
RELAIS_AUTO_APPROVE_CARE_TEAM: bool = env.bool("RELAIS_AUTO_APPROVE_CARE_TEAM", True)
# Break-the-glass: the roles the region allows, the shortest justification, the window.
RELAIS_BREAK_THE_GLASS_ROLES: list[str] = env.list(
    "RELAIS_BREAK_THE_GLASS_ROLES", ["emergency_doctor", "radiologist"]
)
RELAIS_BREAK_THE_GLASS_MIN_JUSTIFICATION: int = env.int(
    "RELAIS_BREAK_THE_GLASS_MIN_JUSTIFICATION", 30, validate=Range(min=1, max=2000)
)
RELAIS_BREAK_THE_GLASS_HOURS: float = env.float(
    "RELAIS_BREAK_THE_GLASS_HOURS", 4, validate=Range(min=0.25, max=24)
)
# The retrieval gateway (/dicomweb/): the web origins a viewer on another site (OHIF) may call
# it from (CORS; comma-separated, e.g. https://viewer.example.org).
RELAIS_GATEWAY_CORS_ORIGINS: list[str] = env.list("RELAIS_GATEWAY_CORS_ORIGINS", [])
# Under gunicorn (HTTP/1.1, no TLS in gunicorn itself), a study's instances are moved from the
# archive's socket to the client's inside the kernel (sharing/zero_copy.py). Turn it off for a
# server that frames bodies otherwise (gunicorn's --protocol uwsgi).
RELAIS_GATEWAY_SPLICE: bool = env.bool("RELAIS_GATEWAY_SPLICE", True)
# Consent: the model outside the care team ("opt-in": a recorded consent is needed; "opt-out":
# permitted unless opposed), the largest evidence document accepted.
RELAIS_CONSENT_OUTSIDE_CARE_TEAM: str = env.str(
    "RELAIS_CONSENT_OUTSIDE_CARE_TEAM", "opt-in", validate=OneOf(["opt-in", "opt-out"])
)
# The consent policies of the affinity domain, named by OID as IHE BPPC does (export).
RELAIS_CONSENT_POLICY_OIDS: dict[str, str] = {
    "opposition": env.str("RELAIS_CONSENT_OID_OPPOSITION", "1.2.250.1.999.1.1.1"),
    "consent": env.str("RELAIS_CONSENT_OID_CONSENT", "1.2.250.1.999.1.1.2"),
    "mask": env.str("RELAIS_CONSENT_OID_MASK", "1.2.250.1.999.1.1.3"),
}
RELAIS_CONSENT_EVIDENCE_MAX_BYTES: int = env.int(
    "RELAIS_CONSENT_EVIDENCE_MAX_BYTES", 5 * 1024 * 1024, validate=Range(min=1024)
)
LOG_LEVEL: str = env.log_level("LOG_LEVEL", "INFO")

try:
    env.seal()
except EnvError as exc:  # pragma: no cover - exercised by tests/unit/test_settings.py
    raise ImproperlyConfigured(f"Bad environment: {exc}") from exc

_unknown_roles = set(RELAIS_BREAK_THE_GLASS_ROLES) - {
    "referring_doctor",
    "radiologist",
    "teleradiologist",
    "emergency_doctor",
}
if _unknown_roles:
    raise ImproperlyConfigured(
        f"RELAIS_BREAK_THE_GLASS_ROLES: not clinical roles: {', '.join(sorted(_unknown_roles))}"
    )
if len(RELAIS_DICOM_AE_TITLE.strip()) == 0 or len(RELAIS_DICOM_AE_TITLE) > 16:
    raise ImproperlyConfigured("RELAIS_DICOM_AE_TITLE must be 1 to 16 characters")
_tls_files = (RELAIS_DICOM_TLS_CERT, RELAIS_DICOM_TLS_KEY, RELAIS_DICOM_TLS_CA)
if any(_tls_files) and not all(_tls_files):
    raise ImproperlyConfigured(
        "DICOM over TLS needs RELAIS_DICOM_TLS_CERT, RELAIS_DICOM_TLS_KEY and RELAIS_DICOM_TLS_CA"
    )
for _tls_file in filter(None, _tls_files):
    if not _tls_file.is_file():
        raise ImproperlyConfigured(f"DICOM TLS file not found: {_tls_file}")
if RELAIS_ARCHIVE_HTTPS_CA is not None and not RELAIS_ARCHIVE_HTTPS_CA.is_file():
    raise ImproperlyConfigured(f"RELAIS_ARCHIVE_HTTPS_CA not found: {RELAIS_ARCHIVE_HTTPS_CA}")

DATA_DIR.mkdir(parents=True, exist_ok=True)
if not SECRET_KEY:
    SECRET_KEY = load_or_create_secret_key(DATA_DIR)
elif len(SECRET_KEY) < 50:
    raise ImproperlyConfigured("SECRET_KEY must be at least 50 characters (or unset: generated)")
RELAIS_SIGNING_KEY_PATH: Path = load_or_create_signing_key(DATA_DIR)
RELAIS_EVIDENCE_KEY_PATH: Path = load_or_create_evidence_key(DATA_DIR)

if _DATABASE_URL:
    try:
        _default_db = dj_database_url.parse(_DATABASE_URL, conn_max_age=CONN_MAX_AGE)
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from exc
else:
    _default_db = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "relais.sqlite3"),
    }
if _default_db["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE: every transaction takes the write lock when it starts, so two
    # writers never deadlock on the lock upgrade (the audit chain relies on it).
    _default_db["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
        "PRAGMA foreign_keys=ON;",
    }
    # Tests use a file too: threads of the DICOM server share it with the test, and an
    # in-memory database's shared-cache locks fail at once instead of waiting.
    _default_db["TEST"] = {"NAME": str(DATA_DIR / "test-relais.sqlite3")}
elif _default_db["ENGINE"] == "django.db.backends.postgresql":
    # Server-side binding lets psycopg prepare the statements a process repeats (after
    # five uses), which spares PostgreSQL the planning of every registry query.
    _default_db.setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
else:
    raise ImproperlyConfigured(
        f"DATABASE_URL names {_default_db['ENGINE']}: Relais runs on PostgreSQL or SQLite"
    )
DATABASES = {"default": _default_db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_api_key",
    "drf_spectacular",
    "django_filters",
    "guardian",
    "corsheaders",
    "audit",
    "broker",
    "consent",
    "sharing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "broker.urls"
WSGI_APPLICATION = "broker.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/admin/login/"
ANONYMOUS_USER_NAME = None  # guardian: no anonymous user object

LANGUAGES = [("fr", "Français"), ("en", "English")]
USE_I18N = True
USE_TZ = True
LOCALE_PATHS = [BASE_DIR / "locale"]

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise expects it, even before collectstatic

SESSION_COOKIE_SECURE = RELAIS_HTTPS
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# CORS (django-cors-headers) for the gateway only: tokens travel in the Authorization header,
# never in cookies, so no credentials are allowed. (A signed-in user's session also answers
# QIDO-RS, for the broker's own pages only: sharing/dicomweb.py checks Sec-Fetch-Site.)
CORS_URLS_REGEX = r"^/dicomweb/.*$"
CORS_ALLOWED_ORIGINS = RELAIS_GATEWAY_CORS_ORIGINS
CORS_ALLOW_METHODS = ("GET", "OPTIONS")
CORS_ALLOW_CREDENTIALS = False
CORS_EXPOSE_HEADERS = ("Content-Type", "Content-Length", "Retry-After", "WWW-Authenticate")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "broker.api.authentication.InstitutionApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "broker.api.problems.problem_exception_handler",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
API_KEY_CUSTOM_HEADER = None

SPECTACULAR_SETTINGS = {
    "TITLE": "Relais API",
    "DESCRIPTION": "Regional broker of imaging manifests (IHE XDS-I.b style).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {
        "ConsentPurposeEnum": ["treatment", "avis", "teleradiology", "emergency"],
        "ConsentScopeEnum": ["all", "institution", "professional", "study"],
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
}
