"""Prefix trees of n-best hypotheses, for attention rescoring (torch-free).

The left-to-right decoder's output at position j of a hypothesis depends only on
<sos> y_1 .. y_j (causal self-attention), so hypotheses that share a prefix share
those rows. A CTC n-best shares most of its prefixes (10 hypotheses of a trained
demo model: about half of the rows are repeats), so the decoder runs on each
distinct prefix once: the prefixes become the nodes of a tree, laid out as one
sequence whose self-attention mask lets a node see its ancestors only, at positions
given by their depth (`TransformerDecoder.forward_prefix_tree`). Right-to-left
scores use the tree of the reversed hypotheses (shared suffixes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

# inputs of decoder_tree.onnx, in order
DECODER_TREE_INPUTS = ("tokens", "depth", "ancestors", "r_tokens", "r_depth", "r_ancestors",
                       "encoder_out")


@dataclass
class PrefixTrees:
    """M prefix trees padded to P nodes, and where each hypothesis's scores lie.

    tokens: (M, P) int64 each node's last token (<sos> at the root, node 0);
    depth: (M, P) int64 its position (the root 0);
    ancestors: bool (M, P, P), [m, p, q] True when q is on the path root..p (p
        included); padding nodes see only themselves;
    rows: (R,) int64 flat node indices `m * P + p` and targets: (R,) int64 the token
        each scored node predicts (the next token, then <eos>), R = sum (len + 1);
    owner: (R,) int64 the hypothesis of each of them.
    """
    tokens: np.ndarray
    depth: np.ndarray
    ancestors: np.ndarray
    rows: np.ndarray
    targets: np.ndarray
    owner: np.ndarray

    @property
    def nodes(self) -> int:
        """P, the (padded) nodes per tree."""
        return int(self.tokens.shape[1])

    def scores(self, log_probs: np.ndarray, num: int) -> np.ndarray:
        """(num,) float64 per hypothesis sum of log p(token) and log p(<eos>), from
        the decoder's (M, P, V) log-probabilities of the trees."""
        flat = log_probs.reshape(-1, log_probs.shape[-1])
        picked = flat[self.rows, self.targets].astype(np.float64)
        return np.bincount(self.owner, weights=picked, minlength=num)[:num]


def build_prefix_trees(hyps: Sequence[Sequence[int]], tree_of: Sequence[int], sos: int,
                       eos: int, reverse: bool = False) -> PrefixTrees:
    """The prefix trees of `hyps` (token ids, no <sos>/<eos>), hypothesis i in tree
    `tree_of[i]` (e.g. its utterance; trees 0 .. max); with `reverse` the trees of
    the reversed hypotheses (right-to-left decoder)."""
    n_trees = (max(tree_of) + 1) if len(tree_of) else 0
    node_ids: List[Dict[Tuple[int, int], int]] = [{} for _ in range(n_trees)]  # (parent, token)
    tokens: List[List[int]] = [[sos] for _ in range(n_trees)]
    parents: List[List[int]] = [[-1] for _ in range(n_trees)]
    depths: List[List[int]] = [[0] for _ in range(n_trees)]
    paths: List[Tuple[int, List[int], List[int]]] = []
    for hyp, m in zip(hyps, tree_of):
        seq = [int(t) for t in (list(hyp)[::-1] if reverse else hyp)]
        ids, path = node_ids[m], [0]
        for j, token in enumerate(seq):
            key = (path[-1], token)
            node = ids.get(key)
            if node is None:
                node = ids[key] = len(tokens[m])
                tokens[m].append(token)
                parents[m].append(path[-1])
                depths[m].append(j + 1)
            path.append(node)
        paths.append((m, path, seq + [eos]))
    size = max((len(t) for t in tokens), default=1)
    tok = np.full((n_trees, size), eos, dtype=np.int64)
    dep = np.zeros((n_trees, size), dtype=np.int64)
    anc = np.zeros((n_trees, size, size), dtype=bool)
    anc[:, np.arange(size), np.arange(size)] = True
    for m in range(n_trees):
        tok[m, : len(tokens[m])] = tokens[m]
        dep[m, : len(depths[m])] = depths[m]
        for node in range(1, len(tokens[m])):      # parents come before their children
            anc[m, node] |= anc[m, parents[m][node]]
    rows = [m * size + node for m, path, _ in paths for node in path]
    targets = [t for _, _, seq in paths for t in seq]
    owner = [i for i, (_, path, _) in enumerate(paths) for _ in path]
    return PrefixTrees(tok, dep, anc, np.asarray(rows, dtype=np.int64),
                       np.asarray(targets, dtype=np.int64), np.asarray(owner, dtype=np.int64))


def decoder_tree_feeds(hyps: Sequence[Sequence[int]], tree_of: Sequence[int], sos: int, eos: int,
                       encoder_out: np.ndarray, right_to_left: bool = True
                       ) -> Tuple[Dict[str, np.ndarray], PrefixTrees, PrefixTrees]:
    """decoder_tree.onnx's inputs (`DECODER_TREE_INPUTS`) scoring `hyps`, hypothesis i
    of utterance `tree_of[i]` (M utterances), with encoder_out (M, T, D): the prefix
    trees of the hypotheses and of their reversals (`right_to_left`; else a root-only
    tree per utterance, for left-to-right scores alone). Returns (feeds, the
    left-to-right trees, the right-to-left ones)."""
    left = build_prefix_trees(hyps, tree_of, sos, eos)
    if right_to_left:
        right = build_prefix_trees(hyps, tree_of, sos, eos, reverse=True)
    else:
        utterances = (max(tree_of) + 1) if len(tree_of) else 0
        right = build_prefix_trees([[]] * utterances, list(range(utterances)), sos, eos)
    arrays = (left.tokens, left.depth, left.ancestors, right.tokens, right.depth, right.ancestors,
              np.ascontiguousarray(encoder_out, dtype=np.float32))
    return dict(zip(DECODER_TREE_INPUTS, arrays)), left, right
