"""The microphone page in headless Chromium, fed a fake capture file, shows the
final result. Where Debian's `chromium` is missing, the setup fixture installs it
with apt-get (as root, unless WENET_MOE_NO_APT=1); the test is skipped when that
is not possible."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect

from wenet_moe_runtime.wavio import read_wav, write_wav



def _find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium():
    """Path of the chromium binary, installed with apt-get if absent and allowed."""
    path = _find_chromium()
    if path is None and os.environ.get("WENET_MOE_NO_APT") != "1" \
            and shutil.which("apt-get") and os.geteuid() == 0:
        try:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = _find_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return path


async def _evaluate(ws_url: str, expression: str):
    async with connect(ws_url, max_size=None, open_timeout=10) as ws:
        await ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate",
                                  "params": {"expression": expression, "returnByValue": True}}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg.get("id") == 1:
                return msg["result"]["result"].get("value")


@pytest.mark.slow
def test_browser_page_streams_microphone_and_shows_final(chromium, server, test_wavs, tmp_path):
    speech, _ = read_wav(test_wavs["u0"])
    capture = str(tmp_path / "mic.wav")
    write_wav(capture, np.concatenate([speech, np.zeros(32000, np.int16)]))
    profile = tmp_path / "profile"
    profile.mkdir()
    page = server.url.replace("ws:", "http:") + "/?autostart=1"
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
           "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
           f"--use-file-for-fake-audio-capture={capture}", "--disable-background-networking",
           "--autoplay-policy=no-user-gesture-required", "--no-first-run",
           "--disable-extensions", "--disable-sync", "--mute-audio",
           f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
           "--remote-debugging-port=0", page]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its debugging port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            targets = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            pages = [t for t in targets if t.get("type") == "page" and "autostart" in t.get("url", "")]
            ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            time.sleep(0.2)
        assert ws_url, "page target not found"
        expr = ("JSON.stringify({finals: Array.from(document.querySelectorAll('#finals .final'))"
                ".map(e => e.textContent), status: document.getElementById('status').textContent,"
                " partial: document.getElementById('partial').textContent})")
        # The capture file loops (speech, 2 s silence); where capture starts within
        # it depends on timing, so wait for a final of a complete repetition.
        state = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = json.loads(asyncio.run(_evaluate(ws_url, expr)) or "{}")
            if "你好世界" in state.get("finals", []) or len(state.get("finals", [])) >= 4:
                break
            time.sleep(0.5)
        assert state.get("finals"), f"no final result shown; page state {state}"
        assert "你好世界" in state["finals"], state
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_resampler_48k_to_16k(tmp_path):
    """The page's resampler (run in node): a 1 kHz tone at 48 kHz becomes the same
    tone at 16 kHz, whatever the block sizes."""
    from wenet_moe_runtime import server as server_mod
    src = open(os.path.join(server_mod.WEB_DIR, "app.js"), encoding="utf-8").read()
    start = src.index("  function makeResampler")
    end = src.index("  function toInt16")
    script = "const TARGET_RATE = 16000;\n" + src[start:end] + """
const x = Float32Array.from({length: 48000}, (_, i) => Math.sin(2 * Math.PI * 1000 * i / 48000));
const one = makeResampler(48000)(x);
const r = makeResampler(48000); let many = []; let off = 0; const sizes = [128, 1000, 7, 4096, 333];
for (let k = 0; off < x.length; k++) { const n = sizes[k % sizes.length];
  many = many.concat(r(x.slice(off, off + n))); off += n; }
console.log(JSON.stringify({one: Array.from(one), many: many}));
"""
    path = tmp_path / "resample.js"
    path.write_text(script)
    out = json.loads(subprocess.run(["node", str(path)], capture_output=True, text=True,
                                    timeout=60, check=True).stdout)
    one, many = np.array(out["one"]), np.array(out["many"])
    assert abs(len(one) - 16000) <= 2
    n = min(len(one), len(many))
    np.testing.assert_allclose(one[:n], many[:n], atol=1e-6)
    t = np.arange(len(one)) / 16000.0
    want = np.sin(2 * np.pi * 1000 * t)
    assert np.max(np.abs(one[10:-10] - want[10:-10])) < 0.02
