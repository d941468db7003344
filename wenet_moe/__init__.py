"""wenet-moe: U2++ Conformer with Mixture-of-Experts feed-forward blocks."""

__version__ = "0.1.0"
