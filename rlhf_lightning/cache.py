"""Directories that cost minutes to rebuild (the dequantised policy, the built-in task's data), shared
through object storage so that fresh containers, retries and later runs reuse them.

Every cached directory lives on local disk first (where the caller keeps it). When
`RLHF_LIGHTNING_SHARED_CACHE` names an `s3://bucket/prefix` (the flow sets it to a folder of the Metaflow
datastore when that is S3), a directory missing locally is fetched from `<prefix>/<key>/`, and one built
here is uploaded there. An upload is complete only once its manifest (`<prefix>/<key>/MANIFEST.json`,
written last) exists, so a container killed mid-upload never leaves a half directory for others.
Credentials and endpoint as boto3 finds them (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` honoured).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "MANIFEST.json"


def shared_root() -> str | None:
    """`RLHF_LIGHTNING_SHARED_CACHE` (an s3:// prefix), or None: local caches only."""
    root = os.environ.get("RLHF_LIGHTNING_SHARED_CACHE", "").rstrip("/")
    if root and not root.startswith("s3://"):
        raise ValueError(f"RLHF_LIGHTNING_SHARED_CACHE={root!r}: give an s3://bucket/prefix (or unset it)")
    return root or None


def s3_client():
    """The library's one S3 client (shared caches, checkpoints, `s3://` data sources): endpoint from
    `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, credentials as boto3 finds them."""
    import boto3  # installed with mlflow; imported only when something is on S3

    return boto3.client("s3")


def s3_split(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def fetch(key: str, dest: str | Path) -> bool:
    """Download the shared copy of `key` into `dest`, which must not exist yet. False when there is no
    shared cache, no complete copy of `key` in it, or `dest` exists by the time the download is done."""
    root = shared_root()
    if root is None:
        return False
    from botocore.exceptions import ClientError

    s3 = s3_client()
    bucket, prefix = s3_split(f"{root}/{key}")
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return False
        raise
    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.fetch{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    for rel in manifest["files"]:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{rel}", str(target))
    try:
        tmp.rename(dest)  # atomic: readers never see a partial directory
    except OSError:  # `dest` appeared meanwhile (or was left half-built): the caller decides
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    print(f"cache: fetched {key} ({manifest['bytes'] / 1e6:.1f} MB) from {root} in {time.monotonic() - started:.1f} s",
          flush=True)
    return True


def publish(key: str, src: str | Path) -> None:
    """Upload directory `src` as the shared copy of `key` (nothing without a shared cache)."""
    root = shared_root()
    if root is None:
        return
    s3 = s3_client()
    bucket, prefix = s3_split(f"{root}/{key}")
    src = Path(src)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    for rel in files:
        s3.upload_file(str(src / rel), bucket, f"{prefix}/{rel}")
    size = sum((src / rel).stat().st_size for rel in files)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=json.dumps({"files": files, "bytes": size}).encode())
    print(f"cache: stored {key} ({size / 1e6:.1f} MB) in {root}", flush=True)
