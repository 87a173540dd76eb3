"""CPU-host workarounds for SGLang 0.5.23, run at interpreter start-up from a ``.pth`` file.

``boot`` holds the workarounds (see its docstring); ``pth`` writes/removes the ``.pth`` file
(``python -m dynsplit_sglang.patches.cpu_host install|uninstall|status``). Keep this file free
of imports: the boot path goes through it.
"""
