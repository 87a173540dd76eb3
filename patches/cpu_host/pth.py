"""Write or remove the ``.pth`` file that runs ``boot.py`` at start-up of every interpreter of
the current environment (venv). Idempotent.

The ``.pth`` line loads ``boot.py`` by file path rather than importing
``dynsplit_sglang.patches.cpu_host.boot``: importing the package would run
``dynsplit_sglang/__init__.py`` (and whatever it grows to import, e.g. torch) in every Python
process, pip included. A missing file (moved checkout) is skipped silently.
"""

import os
import sysconfig

PTH_NAME = "dynsplit_sglang_cpu_host.pth"
BOOT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot.py")


def site_dir() -> str:
    return sysconfig.get_paths()["purelib"]


def pth_path() -> str:
    return os.path.join(site_dir(), PTH_NAME)


def is_installed() -> bool:
    return os.path.exists(pth_path())


def pth_line(boot_path: str = BOOT_PATH) -> str:
    # site.py only executes .pth lines that start with "import"; everything must fit on one line.
    return (
        "import os, importlib.util as u; "
        f"p = {boot_path!r}; "
        's = os.path.exists(p) and u.spec_from_file_location("_dynsplit_cpu_host_boot", p); '
        "s and s.loader.exec_module(u.module_from_spec(s))\n"
    )


def install() -> tuple[str, bool]:
    """Return (path, changed)."""
    path, line = pth_path(), pth_line()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == line:
                return path, False
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(line)
    os.replace(tmp, path)
    return path, True


def uninstall() -> tuple[str, bool]:
    path = pth_path()
    if not os.path.exists(path):
        return path, False
    os.remove(path)
    return path, True
