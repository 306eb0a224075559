"""Model-file resolution: local directories, a fake Hugging Face cache, downloads, offline mode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from blip2 import hub
from blip2.hub import ModelNotFoundError, cached_snapshot, resolve_file
from blip2.processing import Blip2ImageProcessor, Blip2Processor, Tokenizer

NEWEST = Path(__file__).parent / "fixtures" / "processor_newest" / "opt"
MAIN, V1 = "a" * 40, "b" * 40


def fake_cache(root: Path, repo_id: str = "org/tiny-blip2") -> Path:
    """huggingface_hub's layout: blobs, snapshots of symlinks, refs for a branch and a tag, .no_exist."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, size in ((MAIN, 224), (V1, 364)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        processor = Blip2Processor.from_pretrained(NEWEST)
        processor.image_processor.size = {"height": size, "width": size}
        staged = root / f"staged-{commit[:4]}"
        processor.save_pretrained(staged)
        for file in staged.iterdir():
            blob = repo / "blobs" / f"{commit[:4]}-{file.name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(file, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    (repo / ".no_exist" / MAIN).mkdir(parents=True)
    (repo / ".no_exist" / MAIN / "spiece.model").touch()
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return fake_cache(tmp_path / "hf-cache")


@pytest.fixture
def no_download(monkeypatch):
    """Fails the test if anything tries the network."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_local_directory_wins(tmp_path, no_download):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_file(tmp_path, "config.json") == tmp_path / "config.json"
    assert resolve_file(tmp_path, "absent.json", required=False) is None
    with pytest.raises(ModelNotFoundError, match=f"absent.json not found in model directory {tmp_path}"):
        resolve_file(tmp_path, "absent.json")


def test_snapshot_by_branch_tag_and_commit(cache, no_download):
    main = resolve_file("org/tiny-blip2", "preprocessor_config.json", cache_dir=cache)
    assert main.parent.name == MAIN and main.is_file()
    for revision in ("v1", V1):
        path = resolve_file("org/tiny-blip2", "preprocessor_config.json", cache_dir=cache, revision=revision)
        assert path.parent.name == V1
    assert cached_snapshot("org/tiny-blip2", "v1", cache) == cache / "models--org--tiny-blip2" / "snapshots" / V1
    assert cached_snapshot("org/tiny-blip2", "no-such-branch", cache) is None


def test_environment_variables_choose_the_cache(cache, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_file("org/tiny-blip2", "tokenizer.json").parent.name == MAIN
    monkeypatch.delenv("HF_HUB_CACHE")
    home = cache.parent / "hf-home"
    (home).mkdir()
    os.symlink(cache, home / "hub")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.hub_cache() == home / "hub"
    assert resolve_file("org/tiny-blip2", "tokenizer.json", revision="v1").parent.name == V1


def test_processor_from_cache_by_repo_id_and_revision(cache, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = Blip2Processor.from_pretrained("org/tiny-blip2")
    tagged = Blip2Processor.from_pretrained("org/tiny-blip2", revision="v1")
    assert main.image_processor.size["height"] == 224 and tagged.image_processor.size["height"] == 364
    assert main.num_query_tokens == 4
    assert Tokenizer.from_pretrained("org/tiny-blip2")("a photo of").input_ids[0] == 2
    assert Blip2ImageProcessor.from_pretrained("org/tiny-blip2", revision=V1).size["width"] == 364


def test_offline_gives_a_clear_error(cache, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_file("org/not-cached", "config.json", cache_dir=cache)
    message = str(caught.value)
    assert "could not find config.json for 'org/not-cached'" in message
    assert "local directory org/not-cached (does not exist)" in message
    assert f"HF cache {cache} (no snapshot of org/not-cached at revision main)" in message
    assert "offline mode" in message
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_file("org/tiny-blip2", "config.json", cache_dir=cache)  # snapshot exists, file does not
    with pytest.raises(ModelNotFoundError, match="local_files_only=True"):
        monkeypatch.delenv("HF_HUB_OFFLINE")
        resolve_file("org/not-cached", "config.json", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="org/not-cached"):
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
        Blip2Processor.from_pretrained("org/not-cached", cache_dir=cache)


def test_known_missing_file_is_not_downloaded(cache, no_download):
    assert resolve_file("org/tiny-blip2", "spiece.model", cache_dir=cache, required=False) is None
    with pytest.raises(ModelNotFoundError, match="records that org/tiny-blip2 has no spiece.model"):
        resolve_file("org/tiny-blip2", "spiece.model", cache_dir=cache)


def test_download_when_online(cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, token=None):
        calls.append((repo_id, filename, revision, cache_dir, token))
        if filename == "missing.json":
            raise EntryNotFoundError("404")
        if repo_id == "org/broken":
            raise OSError("connection refused")
        path = tmp_path / "downloaded" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = resolve_file("org/remote", "config.json", cache_dir=cache, revision="dev", token="t0ken")
    assert got == tmp_path / "downloaded" / "config.json"
    assert calls[-1] == ("org/remote", "config.json", "dev", cache, "t0ken")
    assert resolve_file("org/remote", "missing.json", cache_dir=cache, required=False) is None
    with pytest.raises(ModelNotFoundError, match="hub repo org/remote has no file missing.json"):
        resolve_file("org/remote", "missing.json", cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="download from the hub failed: OSError: connection refused"):
        resolve_file("org/broken", "config.json", cache_dir=cache)


def test_names_that_are_neither_directory_nor_repo_id(no_download):
    for name in ("./not/here", "/abs/missing", "a/b/c", "bad name/x"):
        with pytest.raises(ModelNotFoundError, match="neither an existing directory nor a hub id"):
            resolve_file(name, "config.json")
    with pytest.raises(ModelNotFoundError, match="empty"):
        resolve_file("", "config.json")  # not the current directory
