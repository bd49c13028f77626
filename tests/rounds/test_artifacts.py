"""The content-addressed artifact store: names are SHA-256 digests, writes are
idempotent, and a stored file that no longer matches its name is refused."""

from __future__ import annotations

import hashlib

import pytest
from django.core.files.storage import storages

from tests.support.fl_harness import use_artifact_folder
from training.rounds.artifacts import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    artifact_store,
    is_digest,
)


@pytest.fixture(autouse=True)
def _artifact_root(settings, tmp_path):
    return use_artifact_folder(settings, tmp_path / "artifacts")


def test_put_returns_the_sha256_and_get_returns_the_bytes(_artifact_root):
    store = artifact_store()
    data = b"\x00model bytes\xff" * 100
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == len(data)
    path = _artifact_root / digest[:2] / digest[2:4] / digest
    assert path.read_bytes() == data


def test_put_is_idempotent(_artifact_root):
    store = artifact_store()
    data = b"same bytes"
    first = store.put(data)
    mtime = (_artifact_root / first[:2] / first[2:4] / first).stat().st_mtime_ns
    assert store.put(data) == first
    files = [p for p in _artifact_root.rglob("*") if p.is_file()]
    assert len(files) == 1
    assert files[0].stat().st_mtime_ns == mtime


def test_empty_bytes_are_an_artifact_too():
    store = artifact_store()
    digest = store.put(b"")
    assert store.get(digest) == b""


def test_missing_artifact():
    store = artifact_store()
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    with pytest.raises(ArtifactMissing):
        store.get(digest)
    with pytest.raises(ArtifactMissing):
        store.size(digest)


@pytest.mark.parametrize("bad", ["", "abc", "G" * 64, "A" * 64, "../" + "a" * 61, "a" * 65])
def test_a_name_that_is_not_a_digest_is_never_a_path(bad):
    store = artifact_store()
    assert not is_digest(bad)
    assert not store.exists(bad)
    with pytest.raises(ArtifactMissing):
        store.get(bad)


def test_a_flipped_byte_on_disk_is_detected(_artifact_root):
    store = artifact_store()
    data = bytes(range(256)) * 4
    digest = store.put(data)
    path = _artifact_root / digest[:2] / digest[2:4] / digest
    raw = bytearray(path.read_bytes())
    raw[17] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactCorrupt, match=digest):
        store.get(digest)


def test_a_truncated_file_is_detected_and_put_repairs_it(_artifact_root):
    store = artifact_store()
    data = b"x" * 1000
    digest = store.put(data)
    path = _artifact_root / digest[:2] / digest[2:4] / digest
    path.write_bytes(data[:500])
    with pytest.raises(ArtifactCorrupt):
        store.get(digest)
    # Writing the right bytes again replaces the damaged copy.
    assert store.put(data) == digest
    assert store.get(digest) == data


def test_the_store_uses_the_configured_backend(_artifact_root):
    assert isinstance(artifact_store(), ArtifactStore)
    assert artifact_store().storage is storages["artifacts"]
    assert str(_artifact_root) == storages["artifacts"].location
