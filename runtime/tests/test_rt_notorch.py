"""The runtime package must work where torch cannot be imported."""
from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys

    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker failed: torch imported")
""")


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def test_every_runtime_module_imports_without_torch():
    proc = _run("""
        import importlib, pkgutil, sys
        import wenet_moe_runtime
        names = [m.name for m in pkgutil.iter_modules(wenet_moe_runtime.__path__)]
        for n in names:
            importlib.import_module("wenet_moe_runtime." + n)
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules)
        print("ok", len(names), sorted(names))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
    for name in ("server", "client", "decoder", "model", "offline", "decode", "batching"):
        assert f"'{name}'" in proc.stdout


def test_decoding_runs_without_torch(tiny_exports, test_wavs):
    proc = _run(f"""
        import sys
        from wenet_moe_runtime.model import OnnxAsrModel
        from wenet_moe_runtime.decoder import DecodeOptions
        from wenet_moe_runtime.offline import decode_samples
        from wenet_moe_runtime.wavio import read_wav
        model = OnnxAsrModel({tiny_exports['full']!r})
        samples, _ = read_wav({test_wavs['u0']!r})
        print(decode_samples(model, samples, DecodeOptions())[0]["sentence"])
        assert "torch" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "你好世界"
