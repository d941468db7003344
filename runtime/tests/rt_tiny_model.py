"""A tiny streaming ASR model in torch with the export's ONNX interface (tests only).

It stands in for a wenet-moe export: `encoder.onnx` (chunk with att/cnn caches,
positional offset, required_cache_size, att_mask), `ctc.onnx` (log-softmax) and
`decoder.onnx` (L2R + R2L log-probs). It is trained for a few hundred steps on
synthetic "speech": every token is a tone burst at its own pitch, so a model of a
few thousand parameters overfits the utterances quickly and decodes them exactly.
"""
from __future__ import annotations

import json
import math
import logging
import os
import warnings
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

SUB, RC = 4, 6                      # conv2d subsampling: rate 4, right context 6
TOKENS = ["你", "好", "世", "界", "语", "音"]
PITCH_HZ = [300.0, 520.0, 760.0, 1010.0, 1290.0, 1600.0]
SR = 16000


def units(vocab: int = 0) -> List[str]:
    """Symbol table lines: <blank> 0, <unk> 1, the tokens, <sos/eos> last; with
    `vocab` > 9 further CJK characters pad the table to that size."""
    extra = [chr(0xAC00 + i) for i in range(max(0, vocab - len(TOKENS) - 3))]
    syms = ["<blank>", "<unk>"] + TOKENS + extra + ["<sos/eos>"]
    return [f"{s} {i}" for i, s in enumerate(syms)]


def synth(token_ids: Sequence[int], lead_s: float = 0.3, tail_s: float = 0.3,
          seed: int = 0, gap_s: float = 0.08, tone_s: float = 0.2) -> np.ndarray:
    """int16 waveform: silence, a tone per token (ids 2..7), silence."""
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


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(T,) float positions -> (T, dim) sinusoidal encodings."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    ang = positions[:, None] * freq[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class TinyEncoder(nn.Module):
    """conv2d subsampling + blocks of (cached attention, causal depthwise conv, FFN)."""

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor, d: int = 32, head: int = 2,
                 blocks: int = 2, kernel: int = 3, bins: int = 80) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("istd", istd)
        self.d, self.head, self.blocks, self.kernel = d, head, blocks, kernel
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.ReLU(), nn.Conv2d(8, 8, 3, 2), nn.ReLU())
        self.proj = nn.Linear(8 * (((bins - 1) // 2 - 1) // 2), d)
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(blocks)])
        self.att_out = nn.ModuleList([nn.Linear(d, d) for _ in range(blocks)])
        self.dw = nn.ModuleList([nn.Conv1d(d, d, kernel, groups=d) for _ in range(blocks)])
        self.ffn = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
                                  for _ in range(blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3 * blocks)])

    def forward(self, chunk, offset, required_cache_size, att_cache, cnn_cache, att_mask):
        """chunk (1,T,80), offset/required_cache_size int64 scalars, att_cache
        (blocks, head, Tc, 2*dk), cnn_cache (blocks, 1, d, kernel-1), att_mask
        (1, 1, Tc+T') bool -> (output (1,T',d), r_att_cache, r_cnn_cache)."""
        x = (chunk - self.mean) * self.istd
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b, t, c * f))
        cache_t = att_cache.size(2)
        pos = torch.arange(t, dtype=torch.float32) + offset.to(torch.float32)
        x = x + sinusoid(pos, self.d).unsqueeze(0)
        dk = self.d // self.head
        new_att, new_cnn = [], []
        key_mask = att_mask                                        # (1,1|T,Tc+T)
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
            score = score.masked_fill(~key_mask[0], -1e4)
            att = torch.matmul(torch.softmax(score, dim=-1), v)     # (H,T,dk)
            x = x + self.att_out[i](att.transpose(0, 1).reshape(1, t, self.d))
            y = self.norms[3 * i + 1](x).transpose(1, 2)            # (1,d,T)
            y = torch.cat([cnn_cache[i], y], dim=2)
            new_cnn.append(y[:, :, -(self.kernel - 1):])
            x = x + self.dw[i](y).transpose(1, 2)
            x = x + self.ffn[i](self.norms[3 * i + 2](x))
        return x, torch.stack(new_att), torch.stack(new_cnn)


class TinyCtc(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, vocab)

    def forward(self, hidden):
        return torch.log_softmax(self.lin(hidden), dim=-1)


class TinyDecoder(nn.Module):
    """L2R and R2L one-layer decoders: causal self-attention + cross-attention."""

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
        return torch.log_softmax(self.out[side](x), dim=-1)

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


def chunk_mask(t: int, chunk: int) -> torch.Tensor:
    """(1, t, t) bool block-causal mask: frame i sees frames of its chunk and before."""
    idx = torch.arange(t)
    return ((idx[None, :] // chunk) <= (idx[:, None] // chunk)).unsqueeze(0)


class TinyAsr(nn.Module):
    def __init__(self, mean, istd, vocab: int, d: int = 32, blocks: int = 2,
                 head: int = 2) -> None:
        super().__init__()
        self.vocab, self.sos = vocab, vocab - 1
        self.encoder = TinyEncoder(mean, istd, d=d, head=head, blocks=blocks)
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


def train_tiny(utts: Sequence[Tuple[np.ndarray, List[int]]], fbank, chunk: int = 4,
               epochs: int = 120, seed: int = 0) -> TinyAsr:
    """Overfit a TinyAsr on (int16 wav, token ids) pairs; `fbank(wav_int16) -> (T,80)`."""
    torch.manual_seed(seed)
    feats = [torch.from_numpy(np.asarray(fbank(w), dtype=np.float32)) for w, _ in utts]
    allf = torch.cat(feats)
    mean, istd = allf.mean(0), 1.0 / (allf.std(0) + 1e-3)
    vocab = len(units())
    model = TinyAsr(mean, istd, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    ctc_loss = nn.CTCLoss(blank=0, zero_infinity=True)
    sos = vocab - 1
    for _ in range(epochs):
        for f, (_, ids) in zip(feats, utts):
            hidden = model.encode_full(f, chunk)
            lp = model.ctc(hidden)
            target = torch.tensor(ids)
            loss = ctc_loss(lp[:, None, :], target[None], torch.tensor([lp.shape[0]]),
                            torch.tensor([len(ids)]))
            ys = torch.tensor([[sos] + ids])
            lens = torch.tensor([len(ids) + 1])
            score, r_score = model.decoder(ys, lens, hidden[None], torch.tensor(0.5))
            gold = torch.tensor(ids + [sos])
            gold_r = torch.tensor(ids[::-1] + [sos])
            loss = loss - score[0, torch.arange(len(gold)), gold].mean() \
                - r_score[0, torch.arange(len(gold_r)), gold_r].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
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
    model = TinyAsr(torch.zeros(80), torch.full((80,), 0.2), vocab, d=d, blocks=blocks, head=head)
    with torch.no_grad():   # a peaked CTC head, so the search sees speech-like posteriors
        model.ctc.lin.bias[0] += 2.0
    model.eval()
    export_onnx(model, out_dir, fbank_conf, chunk=chunk, left_chunks=-1)
