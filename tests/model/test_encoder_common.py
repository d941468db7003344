"""Tiny encoders shared by the encoder tests (no tests of its own)."""
import torch

from wenet_moe.layers.cmvn import GlobalCMVN
from wenet_moe.model.encoder import ConformerEncoder, TransformerEncoder

FEAT = 20


def randomize_norms(model):
    """Non-trivial norm parameters/statistics so eval-mode norms are not identities."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


def cmvn():
    return GlobalCMVN(torch.randn(FEAT) * 0.1, torch.rand(FEAT) + 0.5)


def tiny_conformer(**over):
    conf = dict(output_size=16, attention_heads=2, linear_units=24, num_blocks=2,
                cnn_module_kernel=4, causal=True, use_dynamic_chunk=True,
                cnn_module_norm="layer_norm", dropout_rate=0.1,
                positional_dropout_rate=0.1, attention_dropout_rate=0.1)
    conf.update(over)
    return randomize_norms(ConformerEncoder(FEAT, global_cmvn=cmvn(), **conf)).eval()


def tiny_transformer(**over):
    conf = dict(output_size=16, attention_heads=2, linear_units=24, num_blocks=2,
                use_dynamic_chunk=True)
    conf.update(over)
    return randomize_norms(TransformerEncoder(FEAT, global_cmvn=cmvn(), **conf)).eval()
