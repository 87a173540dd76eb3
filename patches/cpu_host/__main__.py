"""``python -m dynsplit_sglang.patches.cpu_host {install,uninstall,status}``."""

import argparse
import subprocess
import sys

from . import pth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynsplit_sglang.patches.cpu_host",
        description="Manage the .pth file that applies the CPU-host workarounds for SGLang "
        "in every process of this Python environment.",
    )
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    args = parser.parse_args(argv)

    if args.action == "install":
        path, changed = pth.install()
        print(f"{'wrote' if changed else 'up to date'}: {path}")
    elif args.action == "uninstall":
        path, changed = pth.uninstall()
        print(f"{'removed' if changed else 'not present'}: {path}")
    else:
        # A fresh interpreter shows what the .pth file does at start-up, not what this one did.
        probe = (
            "import os, sys; m = sys.modules.get('torchvision._meta_registrations'); "
            "print('SGLANG_USE_CPU_ENGINE =', os.environ.get('SGLANG_USE_CPU_ENGINE')); "
            "print('sgl_kernel shim on sys.path:', any(p.endswith('cpu_host/shim') for p in sys.path)); "
            "print('torchvision meta stub:', getattr(m, '__dynsplit_stub__', False))"
        )
        print(f".pth file: {pth.pth_path()} ({'present' if pth.is_installed() else 'absent'})")
        subprocess.run([sys.executable, "-c", probe], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
