"""Data: audio I/O, fbank, tokenizers, augmentation and the batching pipeline."""
from wenet_moe.data.conf import eval_dataset_conf, resolve_dataset_conf
from wenet_moe.data.dataset import Dataset, build_dataloader
from wenet_moe.data.tokenizer import BpeTokenizer, CharTokenizer, Tokenizer, build_tokenizer

__all__ = ["Dataset", "build_dataloader", "build_tokenizer", "Tokenizer", "CharTokenizer", "BpeTokenizer",
           "eval_dataset_conf", "resolve_dataset_conf"]
