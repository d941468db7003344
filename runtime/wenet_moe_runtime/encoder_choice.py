"""Which encoder graph runs an MoE export on this CPU, measured at first use.

An fp32 MoE export holds its encoder twice: the `.onnx` graph (every MoE FFN as ONNX
Runtime nodes) and `<graph>.kernel/` (the MoE FFNs in the C kernel, `expert_encoder`).
On the development machine (Zen 4) the kernel graph is the faster one, but that is one
CPU's balance of memory bandwidth, vector units and ONNX Runtime's GEMMs. With
`kernel_experts="auto"` (the default) `OnnxAsrModel` times both graphs once on the
machine it runs on and keeps the faster: the export's streaming chunks and, where the
export allows it, one whole-utterance call, over `MEASURE_SECONDS` of random features,
interleaved, median of `MEASURE_REPS`; the `.onnx` graph is taken only when it is
faster by more than `MEASURE_MARGIN` (past that the two are a tie, and a noisy
measurement should not flip between them). The decision is cached in
`<kernel cache>/encoder_choices.json`, keyed by the CPU, the kernel's build, the
thread count and the two graphs' files (path, size, modification time), so that a
later load reads it instead of measuring (~1-3 s for the paper-size MoE).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from . import native

LOG = logging.getLogger(__name__)

POLICIES = ("auto", "on", "off")
ENV = "WENET_MOE_KERNEL_EXPERTS"
CHOICES_FILE = "encoder_choices.json"
MEASURE_SECONDS = 3.0      # of random features per measured run
MEASURE_REPS = 3           # measured runs per graph (after one warm-up run each)
MEASURE_MARGIN = 0.05      # the .onnx graph must be this much faster to be taken
MAX_ENTRIES = 256          # entries kept in the cache file (the newest)
STREAMING_CHUNK = 16       # chunk measured for exports without a fixed chunk size


def policy(kernel_experts) -> str:
    """"auto" | "on" | "off" from `OnnxAsrModel`'s `kernel_experts`: a policy name, or
    a bool (False: "off"; True: `$WENET_MOE_KERNEL_EXPERTS`, else "auto").
    Raises ValueError naming the bad value."""
    if kernel_experts is False:
        return "off"
    if kernel_experts is True:
        value = os.environ.get(ENV, "") or "auto"
        if value not in POLICIES:
            raise ValueError(f"{ENV}: expected one of {', '.join(POLICIES)}, got {value!r}")
        return value
    if kernel_experts in POLICIES:
        return kernel_experts
    raise ValueError(f"kernel_experts: expected a bool or one of {', '.join(POLICIES)}, "
                     f"got {kernel_experts!r}")


@dataclass
class Choice:
    """A measured (or cached) decision: `graph` "kernel" or "onnx", and the seconds of
    one measured run of each (`kernel_s`, `onnx_s`)."""
    graph: str
    kernel_s: float
    onnx_s: float
    cached: bool = False

    def describe(self) -> str:
        """One line for logs and `/health`."""
        how = "cached measurement" if self.cached else "measured"
        return (f"{how} on this CPU: kernel graph {self.kernel_s * 1e3:.1f} ms, "
                f".onnx graph {self.onnx_s * 1e3:.1f} ms")


def _file_identity(path: str) -> List:
    """[real path, size, mtime_ns] of a file ([path] when it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return [os.path.realpath(path)]
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def choice_key(graph_path: str, kernel_path: str, threads: int) -> str:
    """The cache key of a measurement: this CPU, the kernel's build, the thread count
    and the files of both graphs."""
    lib = native.library()
    parts = [native._cpu_signature(), native.target_arch(),
             os.path.basename(getattr(lib, "_name", "") or ""), int(threads),
             _file_identity(graph_path)]
    for name in sorted(os.listdir(kernel_path)) if os.path.isdir(kernel_path) else []:
        if name.endswith((".onnx", ".json", ".npz")):
            parts.append(_file_identity(os.path.join(kernel_path, name)))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _cache_path() -> str:
    return os.path.join(str(native._cache_dir()), CHOICES_FILE)


def read_cache() -> Dict[str, Dict]:
    """The cached decisions ({} when the file is missing or unreadable: a warning
    names it, and the next measurement rewrites it)."""
    path = _cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        LOG.warning("%s: unreadable (%s); measuring again", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(key: str, choice: Choice, graph_path: str) -> None:
    """Add `choice` under `key` (atomically: a temporary file renamed); a cache that
    cannot be written is logged, not fatal."""
    path = _cache_path()
    entries = read_cache()
    entries[key] = {"graph": choice.graph, "kernel_s": choice.kernel_s, "onnx_s": choice.onnx_s,
                    "file": graph_path, "when": time.time()}
    newest = sorted(entries.items(), key=lambda kv: kv[1].get("when", 0) if isinstance(kv[1], dict)
                    else 0)[-MAX_ENTRIES:]
    tmp = ""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".encoder_choices_", suffix=".json", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(newest), f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        LOG.warning("%s: cannot write the encoder choice (%s)", path, exc)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def cached_choice(key: str) -> Optional[Choice]:
    """The decision cached under `key`, or None."""
    entry = read_cache().get(key)
    if entry is None:
        return None
    try:
        choice = Choice(entry["graph"], float(entry["kernel_s"]), float(entry["onnx_s"]), cached=True)
    except (KeyError, TypeError, ValueError):
        choice = None
    if choice is not None and choice.graph in ("kernel", "onnx"):
        return choice
    LOG.warning("%s: entry %s is malformed (%r); measuring again", _cache_path(), key, entry)
    return None


def measure(run: Callable[[str], None], kinds=("kernel", "onnx"), reps: int = MEASURE_REPS) -> Dict[str, float]:
    """{kind: median seconds of `run(kind)`}: one warm-up run of each, then `reps`
    rounds with the kinds interleaved in alternating order."""
    times: Dict[str, List[float]] = {k: [] for k in kinds}
    for rep in range(reps + 1):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
            start = time.perf_counter()
            run(kind)
            if rep:
                times[kind].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def decide(times: Dict[str, float], margin: float = MEASURE_MARGIN) -> Choice:
    """The kernel graph unless the .onnx graph took less than 1 / (1 + margin) of its time."""
    graph = "onnx" if times["onnx"] * (1 + margin) < times["kernel"] else "kernel"
    return Choice(graph, times["kernel"], times["onnx"])


def workload(model, seconds: float = MEASURE_SECONDS) -> Callable[[], None]:
    """What one measured run of `model`'s loaded encoder does: `seconds` of random
    fbank features (seeded) in the export's streaming chunks, then (unless the export
    fixes its left chunks) as one whole-utterance call."""
    from .offline import encode_chunks      # (offline imports this module's user)
    info = model.info
    frames = max(int(seconds * 1000.0 / info.fbank_shift_ms), info.right_context + 1)
    feats = np.random.default_rng(0).standard_normal((frames, int(info.fbank.num_mel_bins))).astype(np.float32)
    chunk = info.chunk_size if info.chunk_size > 0 else STREAMING_CHUNK
    whole = info.left_chunks <= 0

    def run() -> None:
        encode_chunks(model, feats, chunk)
        if whole:
            encode_chunks(model, feats, -1)
    return run


def add_arguments(parser) -> None:
    """`--kernel_experts {auto,on,off}` and `--no_kernel_experts` (= off) on an
    argparse parser (the server's and `wenet_moe_runtime.decode`'s)."""
    parser.add_argument("--kernel_experts", choices=POLICIES, default=None,
                        help="MoE FFNs in the C kernel (the export's .kernel/ graphs): auto = "
                             "unless the .onnx graph measured faster on this CPU (measured once, "
                             f"cached); on; off. Default: ${ENV}, else auto")
    parser.add_argument("--no_kernel_experts", action="store_true",
                        help="the same as --kernel_experts off: run the .onnx encoder graphs")


def from_arguments(args) -> object:
    """`OnnxAsrModel`'s kernel_experts from `add_arguments`' options (True: the
    environment's policy, else auto). Raises ValueError when both are given and differ."""
    if args.no_kernel_experts:
        if args.kernel_experts not in (None, "off"):
            raise ValueError(f"--no_kernel_experts contradicts --kernel_experts {args.kernel_experts}")
        return "off"
    return True if args.kernel_experts is None else args.kernel_experts
