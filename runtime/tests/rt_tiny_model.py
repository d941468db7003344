"""A tiny streaming ASR model in torch with the export's ONNX interface (tests only).

It stands in for a wenet-moe export: `encoder.onnx` (chunk with att/cnn caches,
positional offset, required_cache_size, att_mask), `ctc.onnx` (log-softmax) and
`decoder.onnx` (L2R + R2L log-probs). Its "speech" is synthetic: every token is a
tone burst at its own pitch (`synth`).

`build_tiny` constructs the weights instead of training them, so that every
decision is taken by a wide margin, whatever the CPU, thread count or kernels:

- front end (in place of conv2d subsampling, same output length
  `(T - 7) // 4 + 1`): output frame i averages log-mel frames 4i+3 and 4i+4
  (`POOL`) of its 7-frame window, minus the noise floor (the CMVN mean), clipped
  at 0 (digital silence and the noise floor both become ~0), minus its mean over
  the bins (white noise of any level becomes ~0), minus `EXCESS_NATS`,
  clipped at 0: `e`, the (1, T', 80) tone energy above a flat spectrum;
- the first `N_MAIN` output dims ("main") are nearest-centroid scores
  `g * (t_k . e - |t_k|^2 / 2)` with tone templates t_k (float64 means of `e`
  over frames inside tone k) and the blank centroid at 0 (score 0);
- the cached attention / causal depthwise conv / FFN blocks and the positional
  encoding write only the other ("aux") dims (`aux_mask`), so the chunk/cache
  logic of the runtime is still exercised for real; the CTC head reads only main
  dims;
- the decoder's logits are `out(tanh(x))` with `|b_v| + sum_i |W_vi| <= DEC_BOUND`
  for every v, so every per-token log-prob is within `2 * DEC_BOUND` of `-log V`
  on any input: the CTC margins decide attention rescoring
  (`test_rt_fixture.py` states and checks the bound).
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

SUB, RC = 4, 6                      # subsampling rate 4, right context 6 (as conv2d)
TOKENS = ["你", "好", "世", "界", "语", "音"]
PITCH_HZ = [300.0, 520.0, 760.0, 1010.0, 1290.0, 1600.0]
SR = 16000
SHIFT, WIN = 160, 400               # fbank frame shift / length in samples (10 / 25 ms)
POOL = (3, 4)                       # frames of each 7-frame window the front end averages
EXCESS_NATS = 3.0                   # log-energy above a flat spectrum that counts as tone
N_MAIN = 1 + len(TOKENS)            # main dims: blank score, then one score per token
MAIN_SCORE = 50.0                   # the smallest template's own score (nats)
OFF_LOGIT = -40.0                   # <unk>, <sos/eos> and padding tokens in the CTC head
DEC_BOUND = 0.1                     # bound of |decoder logit| (see the module docstring)


def units(vocab: int = 0) -> List[str]:
    """Symbol table lines: <blank> 0, <unk> 1, the tokens, <sos/eos> last; with
    `vocab` > 9 further CJK characters pad the table to that size."""
    extra = [chr(0xAC00 + i) for i in range(max(0, vocab - len(TOKENS) - 3))]
    syms = ["<blank>", "<unk>"] + TOKENS + extra + ["<sos/eos>"]
    return [f"{s} {i}" for i, s in enumerate(syms)]


def synth(token_ids: Sequence[int], lead_s: float = 0.3, tail_s: float = 0.3,
          seed: int = 0, gap_s: float = 0.08, tone_s: float = 0.2) -> np.ndarray:
    """int16 waveform: silence, a tone per token (ids 2..7), silence; Gaussian
    noise of std 3e-4 (of full scale) throughout."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(int(lead_s * SR))]
    for k, tok in enumerate(token_ids):
        f = PITCH_HZ[tok - 2]
        n = int(tone_s * SR)
        t = np.arange(n) / SR
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        tone = (0.5 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(4 * np.pi * f * t)) * env
        parts += [tone * 0.4, np.zeros(int(gap_s * SR))]
    parts.append(np.zeros(int(tail_s * SR)))
    wav = np.concatenate(parts) + rng.normal(0, 3e-4, sum(len(p) for p in parts))
    return np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)


def tone_spans(token_ids: Sequence[int], lead_s: float = 0.3, gap_s: float = 0.08,
               tone_s: float = 0.2, start: int = 0) -> List[Tuple[int, int, int]]:
    """(first sample, end sample, token id) of each tone of `synth(token_ids, ...)`
    placed at sample `start`."""
    spans, pos = [], start + int(lead_s * SR)
    for tok in token_ids:
        n = int(tone_s * SR)
        spans.append((pos, pos + n, tok))
        pos += n + int(gap_s * SR)
    return spans


def frame_classes(n_samples: int, spans: Sequence[Tuple[int, int, int]],
                  first_frame: int = 0) -> List[Tuple[str, int]]:
    """What each encoder output frame sees: ('silence', 0), ('tone', id) when the
    samples of its pooled fbank frames lie inside one tone, or ('straddle', id)
    when they overlap tone `id` partly. Fbank frame j (snip_edges=False) covers
    samples [160 j - 120, 160 j + 280); output frame i pools frames
    `first_frame + 4 i + POOL`. A frame can never overlap two tones (the pooled
    span, 35 ms, is shorter than a gap, 80 ms)."""
    n_fbank = (n_samples + SHIFT // 2) // SHIFT - first_frame
    out = []
    for i in range((n_fbank - RC - 1) // SUB + 1):
        j0, j1 = first_frame + SUB * i + POOL[0], first_frame + SUB * i + POOL[-1]
        s0 = SHIFT * j0 + SHIFT // 2 - WIN // 2
        s1 = SHIFT * j1 + SHIFT // 2 + WIN // 2
        hit = [(a, b, t) for a, b, t in spans if a < s1 and b > s0]
        assert len(hit) <= 1, "an output frame overlaps two tones"
        if not hit:
            out.append(("silence", 0))
        else:
            a, b, t = hit[0]
            out.append(("tone" if a <= s0 and s1 <= b else "straddle", t))
    return out


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(T,) float positions -> (T, dim) sinusoidal encodings."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    ang = positions[:, None] * freq[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class Conv2dSubsampling(nn.Module):
    """WeNet's conv2d subsampling (two 3x3 stride-2 convs): (1,T,bins) -> (1,T',d)."""

    def __init__(self, bins: int, d: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.ReLU(), nn.Conv2d(8, 8, 3, 2), nn.ReLU())
        self.proj = nn.Linear(8 * (((bins - 1) // 2 - 1) // 2), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, t, c * f))


class ToneFrontEnd(nn.Module):
    """The constructed model's subsampling: (1,T,bins) CMVN-ed log-mel -> (1,T',d),
    T' = (T-7)//4+1; dims [0, N_MAIN) are the classifier's scores of the tone
    energy `excess(x)`, the others a projection of the clipped log-mel."""

    def __init__(self, bins: int, d: int) -> None:
        super().__init__()
        self.classify = nn.Linear(bins, N_MAIN)
        self.aux = nn.Linear(bins, d - N_MAIN)

    @staticmethod
    def clipped(x: torch.Tensor) -> torch.Tensor:
        """(1,T,bins) -> (1,T',bins): frames 4i+POOL averaged, clipped at 0."""
        pooled = nn.functional.avg_pool1d(x[:, POOL[0]: x.size(1) - (RC - POOL[-1])].transpose(1, 2),
                                          len(POOL), SUB)
        return torch.relu(pooled.transpose(1, 2))

    @staticmethod
    def excess(y: torch.Tensor) -> torch.Tensor:
        """Clipped log-mel (1,T',bins) -> energy above a flat spectrum, minus EXCESS_NATS, >= 0."""
        return torch.relu(y - y.mean(dim=-1, keepdim=True) - EXCESS_NATS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.clipped(x)
        return torch.cat([self.classify(self.excess(y)), self.aux(y)], dim=-1)


class TinyEncoder(nn.Module):
    """subsampling + blocks of (cached attention, causal depthwise conv, FFN); the
    blocks and the positional encoding add only to dims where `aux_mask` is 1."""

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor, d: int = 32, head: int = 2,
                 blocks: int = 2, kernel: int = 3, bins: int = 80, front_end: str = "tone") -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("istd", istd)
        self.d, self.head, self.blocks, self.kernel = d, head, blocks, kernel
        if front_end == "tone":
            self.subsampling = ToneFrontEnd(bins, d)
            mask = (torch.arange(d) >= N_MAIN).float()
        else:
            self.subsampling = Conv2dSubsampling(bins, d)
            mask = torch.ones(d)
        self.register_buffer("aux_mask", mask)
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(blocks)])
        self.att_out = nn.ModuleList([nn.Linear(d, d) for _ in range(blocks)])
        self.dw = nn.ModuleList([nn.Conv1d(d, d, kernel, groups=d) for _ in range(blocks)])
        self.ffn = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
                                  for _ in range(blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3 * blocks)])

    def forward(self, chunk, offset, required_cache_size, att_cache, cnn_cache, att_mask):
        """chunk (1,T,80), offset/required_cache_size int64 scalars, att_cache
        (blocks, head, Tc, 2*dk), cnn_cache (blocks, 1, d, kernel-1), att_mask
        (1, 1|T', Tc+T') bool -> (output (1,T',d), r_att_cache, r_cnn_cache)."""
        x = self.subsampling((chunk - self.mean) * self.istd)
        t = x.size(1)
        pos = torch.arange(t, dtype=torch.float32) + offset.to(torch.float32)
        mask = self.aux_mask
        x = x + mask * sinusoid(pos, self.d).unsqueeze(0)
        dk = self.d // self.head
        new_att, new_cnn = [], []
        for i in range(self.blocks):
            y = self.norms[3 * i](x)
            q, k, v = self.qkv[i](y).view(t, 3, self.head, dk).permute(1, 2, 0, 3)  # (H,T,dk) each
            kc, vc = att_cache[i].split(dk, dim=-1)
            k = torch.cat([kc, k], dim=1)
            v = torch.cat([vc, v], dim=1)
            cat = torch.cat([k, v], dim=-1)
            total = k.size(1)
            start = (total - required_cache_size).clamp(min=0) * (required_cache_size > 0).long()
            new_att.append(cat.index_select(1, torch.arange(start, total)))
            score = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(dk)
            score = score.masked_fill(~att_mask[0], -1e4)
            att = torch.matmul(torch.softmax(score, dim=-1), v)     # (H,T,dk)
            x = x + mask * self.att_out[i](att.transpose(0, 1).reshape(1, t, self.d))
            y = self.norms[3 * i + 1](x).transpose(1, 2)            # (1,d,T)
            y = torch.cat([cnn_cache[i], y], dim=2)
            new_cnn.append(y[:, :, -(self.kernel - 1):])
            x = x + mask * self.dw[i](y).transpose(1, 2)
            x = x + mask * self.ffn[i](self.norms[3 * i + 2](x))
        return x, torch.stack(new_att), torch.stack(new_cnn)


class TinyCtc(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, vocab)

    def forward(self, hidden):
        return torch.log_softmax(self.lin(hidden), dim=-1)


class TinyDecoder(nn.Module):
    """L2R and R2L one-layer decoders: causal self-attention + cross-attention;
    logits `out(tanh(x))`."""

    def __init__(self, d: int, vocab: int, eos: int) -> None:
        super().__init__()
        self.eos, self.d = eos, d
        self.emb = nn.ModuleList([nn.Embedding(vocab, d) for _ in range(2)])
        self.q = nn.ModuleList([nn.Linear(d, d) for _ in range(4)])
        self.out = nn.ModuleList([nn.Linear(d, vocab) for _ in range(2)])

    def _one(self, side: int, ys, enc):
        n, length = ys.shape
        pos = sinusoid(torch.arange(length, dtype=torch.float32), self.d)
        x = self.emb[side](ys) + pos.unsqueeze(0)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        s = torch.matmul(self.q[2 * side](x), x.transpose(1, 2)) / math.sqrt(self.d)
        x = x + torch.matmul(torch.softmax(s.masked_fill(~causal, -1e4), -1), x)
        e = enc.expand(n, -1, -1)
        s2 = torch.matmul(self.q[2 * side + 1](x), e.transpose(1, 2)) / math.sqrt(self.d)
        x = x + torch.matmul(torch.softmax(s2, -1), e)
        return torch.log_softmax(self.out[side](torch.tanh(x)), dim=-1)

    def forward(self, hyps, hyps_lens, encoder_out, reverse_weight):
        """hyps (N,L) with <sos> first, hyps_lens (N,) incl. <sos>, encoder_out
        (1,T,d) -> (score, r_score) (N,L,V) log-probs."""
        n, length = hyps.shape
        j = torch.arange(length).unsqueeze(0).expand(n, length)
        src = (hyps_lens.unsqueeze(1) - j).clamp(min=0, max=length - 1)
        rev = torch.gather(hyps, 1, src)
        rev = torch.where(j == 0, hyps[:, :1].expand(n, length), rev)
        rev = torch.where(j >= hyps_lens.unsqueeze(1), torch.full_like(rev, self.eos), rev)
        score = self._one(0, hyps, encoder_out)
        r_score = self._one(1, rev, encoder_out) + 0.0 * reverse_weight
        return score, r_score

    def logit_bound(self) -> float:
        """max over sides and tokens of |b_v| + sum_i |W_vi|: |logit| <= this on any input."""
        return max(float((o.bias.detach().double().abs() + o.weight.detach().double().abs().sum(1)).max())
                   for o in self.out)


def chunk_mask(t: int, chunk: int) -> torch.Tensor:
    """(1, t, t) bool block-causal mask: frame i sees frames of its chunk and before."""
    idx = torch.arange(t)
    return ((idx[None, :] // chunk) <= (idx[:, None] // chunk)).unsqueeze(0)


class TinyAsr(nn.Module):
    def __init__(self, mean, istd, vocab: int, d: int = 32, blocks: int = 2,
                 head: int = 2, front_end: str = "tone") -> None:
        super().__init__()
        self.vocab, self.sos = vocab, vocab - 1
        self.encoder = TinyEncoder(mean, istd, d=d, head=head, blocks=blocks, front_end=front_end)
        self.ctc = TinyCtc(d, vocab)
        self.decoder = TinyDecoder(d, vocab, vocab - 1)

    def encode_full(self, feats: torch.Tensor, chunk: int) -> torch.Tensor:
        """(T, 80) -> (T', d), equal to running the chunks one by one with caches."""
        enc = self.encoder
        t_out = (feats.shape[0] - RC - 1) // SUB + 1
        att = torch.zeros(enc.blocks, enc.head, 0, 2 * (enc.d // enc.head))
        cnn = torch.zeros(enc.blocks, 1, enc.d, enc.kernel - 1)
        out, _, _ = enc(feats[None], torch.tensor(0), torch.tensor(-1), att, cnn,
                        chunk_mask(t_out, chunk))
        return out[0]


# ------------------------------------------------------------------ construction
def _pooled_np(feats: np.ndarray) -> np.ndarray:
    """float64 (T, bins) -> (T', bins): frames 4i+POOL averaged (ToneFrontEnd's pooling)."""
    n = (feats.shape[0] - RC - 1) // SUB + 1
    idx = SUB * np.arange(n)[:, None] + np.array(POOL)[None, :]
    return feats[idx].mean(axis=1)


def _excess_np(clipped: np.ndarray) -> np.ndarray:
    return np.maximum(clipped - clipped.mean(axis=-1, keepdims=True) - EXCESS_NATS, 0.0)


def build_tiny(fbank: Callable[[np.ndarray], np.ndarray], seed: int = 0,
               n_examples: int = 4) -> TinyAsr:
    """Construct the stand-in model; `fbank(wav_int16) -> (T, 80)` log-mel.

    From `n_examples` noise-only and all-token `synth` waveforms (float64 numpy):
    the CMVN mean is the noise floor's log-mel (istd 1), the templates t_k the
    mean `excess` of output frames inside tone k, and the scale g gives the
    smallest template the score MAIN_SCORE. Every other weight is random (torch
    seed `seed`); the CTC head maps main dim 0 to <blank> and main dim k to token
    k+1 (other tokens at OFF_LOGIT); the decoder's output layers are scaled so
    that `logit_bound() == DEC_BOUND`.
    """
    silence = [np.asarray(fbank(synth([], lead_s=1.0, tail_s=1.0, seed=100 + s)), np.float64)
               for s in range(n_examples)]
    floor = np.concatenate(silence).mean(axis=0)
    feats, classes = [], []
    for s in range(n_examples):
        ids = list(range(2, 2 + len(TOKENS)))
        wav = synth(ids, seed=200 + s)
        feats.append(_pooled_np(np.asarray(fbank(wav), np.float64) - floor))
        classes += frame_classes(len(wav), tone_spans(ids))
    e = _excess_np(np.maximum(np.concatenate(feats), 0.0))
    templates = np.stack([e[[c == ("tone", k) for c in classes]].mean(axis=0)
                          for k in range(2, 2 + len(TOKENS))])
    energy = (templates ** 2).sum(axis=1)
    g = 2.0 * MAIN_SCORE / energy.min()
    vocab = len(units())
    torch.manual_seed(seed)
    model = TinyAsr(torch.from_numpy(floor).float(), torch.ones(floor.shape[0]), vocab)
    with torch.no_grad():
        cls = model.encoder.subsampling.classify
        cls.weight.zero_()
        cls.bias.zero_()
        cls.weight[1:] = torch.from_numpy(g * templates).float()
        cls.bias[1:] = torch.from_numpy(-g * energy / 2).float()
        model.encoder.subsampling.aux.weight.mul_(0.1)
        lin = model.ctc.lin
        lin.weight.zero_()
        lin.bias.fill_(OFF_LOGIT)
        for k in range(N_MAIN):
            tok = 0 if k == 0 else k + 1
            lin.weight[tok, k] = 1.0
            lin.bias[tok] = 0.0
        for o in model.decoder.out:
            o.weight.normal_()
            o.bias.normal_()
        scale = DEC_BOUND / model.decoder.logit_bound()
        for o in model.decoder.out:
            o.weight.mul_(scale * (1 - 1e-6))
            o.bias.mul_(scale * (1 - 1e-6))
    model.eval()
    return model
def export_onnx(model: TinyAsr, out_dir: str, fbank_conf: dict, chunk: int = 4,
                left_chunks: int = -1, reverse_weight: float = 0.3) -> None:
    """Write encoder/ctc/decoder .onnx (+ .int8.onnx), units.txt and metadata."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    os.makedirs(out_dir, exist_ok=True)
    enc = model.encoder
    dk2 = 2 * (enc.d // enc.head)
    required = chunk * left_chunks if left_chunks > 0 else -1
    cache_t = max(required, 0) or 2 * chunk
    window = (chunk - 1) * SUB + RC + 1
    args = (torch.randn(1, window, 80), torch.tensor(cache_t), torch.tensor(required),
            torch.zeros(enc.blocks, enc.head, cache_t, dk2),
            torch.zeros(enc.blocks, 1, enc.d, enc.kernel - 1),
            torch.ones(1, 1, cache_t + chunk, dtype=torch.bool))
    paths = {n: os.path.join(out_dir, f"{n}.onnx") for n in ("encoder", "ctc", "decoder")}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, args, paths["encoder"], dynamo=False, opset_version=17,
                          input_names=["chunk", "offset", "required_cache_size", "att_cache",
                                       "cnn_cache", "att_mask"],
                          output_names=["output", "r_att_cache", "r_cnn_cache"],
                          dynamic_axes={"chunk": {1: "T"}, "att_cache": {2: "T_CACHE"},
                                        "att_mask": {2: "T_ADD_T_CACHE"}, "output": {1: "T_OUT"},
                                        "r_att_cache": {2: "T_CACHE_OUT"}})
        torch.onnx.export(model.ctc, (torch.randn(1, 10, enc.d),), paths["ctc"], dynamo=False,
                          opset_version=17, input_names=["hidden"], output_names=["probs"],
                          dynamic_axes={"hidden": {1: "T"}, "probs": {1: "T"}})
        hyps = torch.tensor([[model.sos, 2, 3, 4], [model.sos, 5, model.sos, model.sos]])
        torch.onnx.export(model.decoder, (hyps, torch.tensor([4, 2]), torch.randn(1, 20, enc.d),
                                          torch.tensor(0.5)),
                          paths["decoder"], dynamo=False, opset_version=17,
                          input_names=["hyps", "hyps_lens", "encoder_out", "reverse_weight"],
                          output_names=["score", "r_score"],
                          dynamic_axes={"hyps": {0: "NBEST", 1: "L"}, "hyps_lens": {0: "NBEST"},
                                        "encoder_out": {1: "T"}, "score": {0: "NBEST", 1: "L"},
                                        "r_score": {0: "NBEST", 1: "L"}})
    meta = {"chunk_size": chunk, "left_chunks": left_chunks, "subsampling_rate": SUB,
            "right_context": RC, "sos_symbol": model.sos, "eos_symbol": model.sos,
            "vocab_size": model.vocab, "is_bidirectional_decoder": 1, "output_size": enc.d,
            "num_blocks": enc.blocks, "head": enc.head, "cnn_module_kernel": enc.kernel,
            "reverse_weight": reverse_weight, "fbank_conf": json.dumps(fbank_conf),
            "decoding_window": window, "batch": 1, "feature_size": 80}
    m = onnx.load(paths["encoder"])
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.save(m, paths["encoder"])
    logging.getLogger().setLevel(logging.ERROR)  # quantizer's pre-processing advice
    for name, path in paths.items():
        quantize_dynamic(path, path.replace(".onnx", ".int8.onnx"), weight_type=QuantType.QInt8)
    # quantize_dynamic keeps metadata_props? Make sure the int8 encoder has them.
    q = onnx.load(paths["encoder"].replace(".onnx", ".int8.onnx"))
    if not any(p.key == "chunk_size" for p in q.metadata_props):
        for k, v in meta.items():
            q.metadata_props.add(key=k, value=str(v))
        onnx.save(q, paths["encoder"].replace(".onnx", ".int8.onnx"))
    with open(os.path.join(out_dir, "units.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(units(model.vocab)) + "\n")


def make_standin_export(out_dir: str, fbank_conf: dict, d: int = 256, blocks: int = 12,
                        head: int = 4, vocab: int = 4000, chunk: int = 16, seed: int = 0) -> None:
    """An untrained model of realistic size (for load tests: compute, not accuracy)."""
    torch.manual_seed(seed)
    model = TinyAsr(torch.zeros(80), torch.full((80,), 0.2), vocab, d=d, blocks=blocks, head=head,
                    front_end="conv2d")
    with torch.no_grad():   # a peaked CTC head, so the search sees speech-like posteriors
        model.ctc.lin.bias[0] += 2.0
    model.eval()
    export_onnx(model, out_dir, fbank_conf, chunk=chunk, left_chunks=-1)
