"""The S3-compatible server of the test environment speaks real S3 over HTTP."""

from __future__ import annotations

import hashlib
import os

import pytest
from boto3.s3.transfer import TransferConfig

pytestmark = pytest.mark.e2e


def test_64mib_multipart_roundtrip_and_ranged_get(s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(64 * 1024 * 1024))
    client = s3.client()
    cfg = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    client.upload_file(str(src), s3.bucket, "blobs/blob.bin", Config=cfg)

    head = client.head_object(Bucket=s3.bucket, Key="blobs/blob.bin")
    assert head["ContentLength"] == 64 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-8"), "expected an 8-part multipart upload"

    # Reassemble from ranged GETs.
    h = hashlib.sha256()
    chunk = 16 * 1024 * 1024
    for start in range(0, 64 * 1024 * 1024, chunk):
        body = client.get_object(
            Bucket=s3.bucket, Key="blobs/blob.bin", Range=f"bytes={start}-{start + chunk - 1}"
        )["Body"].read()
        assert len(body) == chunk
        h.update(body)
    assert h.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
