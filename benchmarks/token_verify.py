#!/usr/bin/env python
"""Retrieval-token verification on one core, next to the Ed25519 verification it rests on.

    .venv/bin/python benchmarks/token_verify.py [--seconds 3] [--runs 5] [--tokens 1000]
                                                [--cpu N] [--profile] [--json out.json]

An Ed25519 key is generated in-process and ``--tokens`` distinct retrieval tokens are issued
with ``token_issue`` (4 Study Instance UIDs of 40 characters, a purpose, a ticket UUID: about
770 characters each), then each measure cycles through them in one thread of one process,
pinned to one core (``os.sched_setaffinity``, inherited by ``openssl``). The measures take
turns, a quarter of a second each, until each has run ``--seconds``. Each run takes, in the
same process and on the same core:

- the peers: ``openssl speed -seconds 2 ed25519`` (its verify/s column; skipped, with a note,
  without an ``openssl`` on PATH; the system's OpenSSL, which may not be the one
  ``cryptography`` bundles: both versions are printed), and the raw Ed25519 verification of
  the same signing inputs with ``cryptography`` (the call ``token_verify`` makes: the ceiling);
- PyJWT's ``jwt.decode`` of the same tokens alone (signature, iss, aud and required claims;
  none of Relais's checks), what the library costs;
- ``token_verify`` on the valid tokens (every one must give back its claims);
- ``token_verify`` on the same tokens with a tampered signature (one bit of R flipped, so that
  the full Ed25519 verification runs; every one must be refused): an attacker chooses this rate;
- ``VerifiedTokens.verify`` on tokens it has seen (what ``sharing.revocation.token_check``
  does for every request after a token's first: cached claims, time, key and audience checks).

Prints verifications/s (median, min, max over ``--runs``), µs per verification, and the ratio
of ``token_verify`` to the raw verification and to ``openssl speed`` (median of the per-run
ratios). ``--profile`` prints cProfile's view of ``token_verify`` instead (figures off).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import datetime as dt
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cryptography  # noqa: E402
import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from sharing.tokens import (  # noqa: E402
    ALGORITHM,
    Claims,
    Grant,
    SigningKey,
    TokenInvalid,
    VerifiedTokens,
    token_issue,
    token_verify,
)

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
ISSUER = "https://relais.example.org/"
AUDIENCE = "https://relais.example.org/dicomweb"
STUDY_ROOT = "1.2.826.0.1.3680043.10.778.2026112"  # + ".<token>.<study>": 40 characters
CHUNK = 50  # calls between two looks at the clock
SLICE = 0.25  # seconds a measure runs before the next one takes its turn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measure and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens cycled through")
    parser.add_argument(
        "--cpu", type=int, default=None, help="the core to pin to (default: the last allowed)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile token_verify instead (figures off)"
    )
    return parser.parse_args()


def pin(cpu: int | None) -> str:
    """Pin this process (and the ``openssl`` it starts) to one core; says which."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this system)"
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return f"pinned to core {chosen} of {os.cpu_count()}"


def issue_tokens(key: SigningKey, count: int) -> list[str]:
    tokens = []
    for n in range(count):
        studies = tuple(f"{STUDY_ROOT}.{n % 1000:03d}.{s}" for s in range(1, 5))
        assert all(len(uid) == 40 for uid in studies)
        grant = Grant(
            subject="10101234567",
            studies=studies,
            purpose="avis",
            ticket=str(uuid.uuid4()),
            not_after=NOW + dt.timedelta(hours=8),
        )
        token, _ = token_issue(key=key, grant=grant, issuer=ISSUER, audience=AUDIENCE, now=NOW)
        tokens.append(token)
    return tokens


def tamper(token: str) -> str:
    """The same token, one bit of the signature's R flipped (still canonical base64url)."""
    signing_input, signature = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[5] ^= 0x01
    return signing_input + "." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def rates(
    measures: dict[str, tuple[Callable[[str], object], Sequence[str]]], seconds: float
) -> dict[str, float]:
    """Calls per second of each measure over its items (cycled), ``seconds`` each.

    The measures take turns, SLICE seconds at a time, so that they share the same moments of
    a host whose speed drifts (this one's does, by ±30 % over a minute): their ratios hold
    better than their absolute figures.
    """
    chunks = {
        name: [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
        for name, (_, items) in measures.items()
    }
    done = dict.fromkeys(measures, 0)
    spent = dict.fromkeys(measures, 0.0)
    position = dict.fromkeys(measures, 0)
    for name, (call, _) in measures.items():
        for item in chunks[name][0]:
            call(item)  # warm-up
    while min(spent.values()) < seconds:
        for name, (call, _) in measures.items():
            start = time.perf_counter()
            deadline = start + SLICE
            while True:
                chunk = chunks[name][position[name]]
                position[name] = (position[name] + 1) % len(chunks[name])
                for item in chunk:
                    call(item)
                done[name] += len(chunk)
                if (now := time.perf_counter()) >= deadline:
                    spent[name] += now - start
                    break
    return {name: done[name] / spent[name] for name in measures}


def openssl_versions() -> str:
    from cryptography.hazmat.backends.openssl import backend

    bundled = f"cryptography {cryptography.__version__} on {backend.openssl_version_text()}"
    if shutil.which("openssl") is None:
        return bundled
    system = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False)
    return f"{bundled}; `openssl` CLI: {system.stdout.strip()}"


def openssl_verify_rate() -> float | None:
    """``openssl speed -seconds 2 ed25519``'s verify/s, or None without an openssl."""
    if shutil.which("openssl") is None:
        return None
    result = subprocess.run(
        ["openssl", "speed", "-seconds", "2", "ed25519"],
        capture_output=True,
        text=True,
        check=True,
    )
    # "...   sign    verify    sign/s verify/s" then " 253 bits EdDSA (Ed25519)  0.0001s  0.0002s  14147.7  4231.0"
    for line in result.stdout.splitlines():
        match = re.search(r"Ed25519\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if match:
            return float(match.group(2))
    raise SystemExit(f"could not read openssl speed's output:\n{result.stdout}")


def main() -> None:
    args = parse_args()
    pinned = pin(args.cpu)
    key = SigningKey("bench-2026-11-28", Ed25519PrivateKey.generate())
    public_keys = {key.kid: key.public_key}
    public = key.public_key
    tokens = issue_tokens(key, args.tokens)
    tampered = [tamper(token) for token in tokens]
    signed = [
        (token.rsplit(".", 1)[0].encode(), base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "=="))
        for token in tokens
    ]
    by_token = dict(zip(tokens, signed, strict=True))

    def verify(token: str) -> Claims:
        return token_verify(
            token, public_keys=public_keys, issuer=ISSUER, audience=AUDIENCE, now=NOW
        )

    def refuse(token: str) -> object:
        try:
            token_verify(token, public_keys=public_keys, issuer=ISSUER, audience=AUDIENCE, now=NOW)
        except TokenInvalid:
            return None
        raise AssertionError("a tampered token verified")

    verified = VerifiedTokens(size=2 * len(tokens))

    def cached(token: str) -> Claims:
        return verified.verify(
            token, public_keys=public_keys, issuer=ISSUER, audience=AUDIENCE, now=NOW
        )

    def raw(token: str) -> object:
        signing_input, signature = by_token[token]
        public.verify(signature, signing_input)
        return None

    def pyjwt(token: str) -> object:
        return jwt.decode(
            token,
            public,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )

    # Every token verifies to its own studies; every tampered one is refused.
    for n, token in enumerate(tokens):
        assert verify(token).studies[0].startswith(f"{STUDY_ROOT}.{n % 1000:03d}.")
    for token in tampered:
        refuse(token)
    for token in tokens:  # warm: every token seen once
        cached(token)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(rates, {"token_verify": (verify, tokens)}, args.seconds)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return

    measures: dict[str, tuple[Callable[[str], object], Sequence[str]]] = {
        "raw": (raw, tokens),
        "pyjwt": (pyjwt, tokens),
        "token_verify": (verify, tokens),
        "tampered": (refuse, tampered),
        "cached": (cached, tokens),
    }
    runs: list[dict[str, float | None]] = []
    for run in range(args.runs):
        figures: dict[str, float | None] = {"openssl": openssl_verify_rate()}
        figures.update(rates(measures, args.seconds))
        runs.append(figures)
        print(
            f"run {run + 1}: "
            + ", ".join(f"{k} {v:,.0f}/s" for k, v in figures.items() if v is not None),
            file=sys.stderr,
        )

    def column(name: str) -> list[float]:
        return [float(v) for r in runs if (v := r[name]) is not None]

    rows = [
        ("peer: `openssl speed -seconds 2 ed25519`, verify", "openssl"),
        ("peer: raw Ed25519 verify (`cryptography`, same signing inputs)", "raw"),
        ("PyJWT `jwt.decode` alone (signature, iss, aud, required claims)", "pyjwt"),
        ("`token_verify`, valid tokens", "token_verify"),
        ("`token_verify`, tampered signature (refused)", "tampered"),
        ("`VerifiedTokens.verify`, a token seen before (the gateway's check)", "cached"),
    ]
    results: dict[str, object] = {
        "pinned": pinned,
        "versions": openssl_versions(),
        "tokens": args.tokens,
        "token_chars": round(statistics.mean(len(t) for t in tokens)),
        "seconds": args.seconds,
        "runs": runs,
    }
    print(
        f"Retrieval token verification: one thread, {pinned}, {args.tokens} distinct tokens "
        f"of {results['token_chars']} characters, {args.runs} runs x {args.seconds:g} s"
    )
    print(results["versions"])
    print()
    print("| measure | verifications/s (median) | min | max | µs each |")
    print("|---|---:|---:|---:|---:|")
    for label, name in rows:
        values = column(name)
        if not values:
            print(f"| {label} | not measured (no `openssl` on PATH) | | | |")
            continue
        median = statistics.median(values)
        results[name] = {"median": median, "min": min(values), "max": max(values)}
        print(
            f"| {label} | {median:,.0f} | {min(values):,.0f} | {max(values):,.0f} "
            f"| {1e6 / median:.0f} |"
        )
    print()
    for peer in ("raw", "openssl"):
        ratios = [
            float(r["token_verify"]) / float(v)  # type: ignore[arg-type]
            for r in runs
            if (v := r[peer]) is not None
        ]
        if not ratios:
            continue
        results[f"ratio_{peer}"] = statistics.median(ratios)
        print(
            f"ratio token_verify / {'raw Ed25519 verify' if peer == 'raw' else 'openssl speed'}: "
            f"{statistics.median(ratios):.2f} (runs: {min(ratios):.2f}-{max(ratios):.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
