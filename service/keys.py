"""API keys as stored: their text, their documents, the first-start key file, `keys`.

Keys look like `jsk_<key_id>_<secret>`; the database keeps only a salted SHA-256 of the
secret (the secret is 256 random bits, so a slow hash would add nothing). Checking a
key on a request is auth.py's `Authenticator`, which caches what it reads here for
`KEY_CACHE_TTL_S`: a revoked key stops working within that time on every instance.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import string
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from .database import Doc, cli_database, run_database_command
from .models import ApiKeyFields
from .settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "jsk_"
KEY_CACHE_TTL_S = 10.0
ADMIN_KEY_FILE = "admin-key"
ENV_ADMIN_USER = "admin"  # the user SERVICE_ADMIN_KEY and the first-start key act as
HIDDEN = {"salt": 0, "hash": 0}  # the projection that lists keys without their secrets


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256((salt + secret).encode()).hexdigest()


def new_key(user_id: str, admin: bool, name: str | None) -> tuple[str, Doc]:
    """A fresh key's text (shown once) and the document that stores only its hash."""
    key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
    doc = ApiKeyFields(
        id=key_id,
        salt=salt,
        hash=hash_secret(salt, secret),
        user_id=user_id,
        admin=admin,
        name=name,
        created=datetime.now(UTC),
    ).document()
    return f"{KEY_PREFIX}{key_id}_{secret}", doc


def split_key(text: str) -> tuple[str, str] | None:
    """`jsk_<16 hex>_<secret>` into (key_id, secret); None for anything else."""
    if not text.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = text[len(KEY_PREFIX) :].partition("_")
    if not sep or not secret or len(key_id) != 16 or not set(key_id) <= set(string.hexdigits):
        return None
    return key_id.lower(), secret


async def find_key(db: AsyncDatabase[Doc], key_id: str) -> Doc | None:
    """The unrevoked key `key_id`, salt and hash included (to verify a secret against)."""
    return await db.api_keys.find_one({"_id": key_id, "revoked_at": None})


async def create_key(
    db: AsyncDatabase[Doc], user_id: str, admin: bool, name: str | None = None
) -> tuple[str, Doc]:
    key, doc = new_key(user_id, admin, name)
    await db.api_keys.insert_one(doc)
    return key, doc


async def list_keys(db: AsyncDatabase[Doc]) -> list[Doc]:
    """Every key without its salt and hash."""
    cursor = db.api_keys.find({}, HIDDEN).sort([("created", 1), ("_id", 1)])
    return await cursor.to_list(None)


async def revoke_key(db: AsyncDatabase[Doc], key_id: str) -> Doc | None:
    """Mark a key revoked (kept for the record); None if there is no such unrevoked key."""
    return await db.api_keys.find_one_and_update(
        {"_id": key_id, "revoked_at": None},
        {"$set": {"revoked_at": datetime.now(UTC)}},
        projection=HIDDEN,
        return_document=ReturnDocument.AFTER,
    )


# --- the first start -----------------------------------------------------------------------


async def ensure_first_key(db: AsyncDatabase[Doc], data_dir: Path) -> None:
    """When no key exists at all, create an admin key and leave it in DATA_DIR/admin-key."""
    if await db.api_keys.find_one({}, {"_id": 1}) is not None:
        return
    key, doc = new_key(ENV_ADMIN_USER, True, "created at first start")
    path = data_dir / ADMIN_KEY_FILE
    try:
        write_private(path, key + "\n")
    except OSError as exc:
        log.error(
            "no API key exists and %s cannot be written (%s): set SERVICE_ADMIN_KEY or run "
            "`python -m service keys create --user admin --admin`",
            path,
            exc.__class__.__name__,
        )
        return
    await db.api_keys.insert_one(doc)
    log.warning(
        "no API key existed: created an admin key, written to %s (mode 0600)", path.resolve()
    )


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- command line: python -m service keys ... ------------------------------------------------


def add_keys_command(commands: Any) -> None:
    """Register `keys create|list|revoke` on the top-level subparsers."""
    keys = commands.add_parser("keys", help="manage API keys (talks to the database directly)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (only this once)")
    create.add_argument("--user", required=True, help="the user the key acts as")
    create.add_argument("--admin", action="store_true", help="the key sees every user's records")
    create.add_argument("--name", help="a note to recognise the key by")
    actions.add_parser("list", help="list keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="ID")


def keys_command(args: argparse.Namespace, settings: Settings) -> int:
    return run_database_command(_keys(args, settings))


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "create" and not 0 < len(args.user) <= 200:
        print("--user must be 1 to 200 characters", file=sys.stderr)
        return 2
    async with cli_database(settings) as db:
        if args.action == "create":
            key, doc = await create_key(db, args.user, args.admin, args.name)
            print(
                f"created key {doc['_id']} for user {args.user!r}"
                f"{' (admin)' if args.admin else ''}; it is shown only this once:",
                file=sys.stderr,
            )
            print(key)
        elif args.action == "list":
            print(f"{'ID':16}  {'USER':20}  ADMIN  {'CREATED':20}  {'REVOKED':20}  NAME")
            for doc in await list_keys(db):
                revoked = doc.get("revoked_at")
                print(
                    f"{doc['_id']:16}  {doc['user_id']:20}  {'yes' if doc['admin'] else 'no':5}  "
                    f"{doc['created']:%Y-%m-%dT%H:%M:%SZ}  "
                    f"{f'{revoked:%Y-%m-%dT%H:%M:%SZ}' if revoked else '-':20}  "
                    f"{doc.get('name') or ''}"
                )
        else:
            if await revoke_key(db, args.key_id) is None:
                print(f"no unrevoked key with id {args.key_id!r}", file=sys.stderr)
                return 1
            print(
                f"revoked key {args.key_id}; running services stop accepting it within "
                f"{KEY_CACHE_TTL_S:g} s",
                file=sys.stderr,
            )
    return 0
