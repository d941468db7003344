"""Prefix trees of n-best lists (`prefix_tree.build_prefix_trees`) against the
definitions: a node per distinct prefix, ancestors = prefixes of the prefix, depth =
its length, and scores summed along each hypothesis's path."""
import numpy as np

from wenet_moe_runtime.prefix_tree import DECODER_TREE_INPUTS, build_prefix_trees, decoder_tree_feeds

SOS, EOS = 9, 9
HYPS = [[1, 2, 3], [1, 2], [1, 4], [], [5, 2, 3], [1, 2, 3, 3]]
OWNERS = [0, 0, 0, 1, 1, 0]


def _prefixes(tree, m):
    """Each real node's prefix (tuple of tokens after <sos>), from tokens and ancestors."""
    out = []
    for p in range(tree.nodes):
        path = [q for q in range(tree.nodes) if tree.ancestors[m, p, q]]
        path.sort(key=lambda q: tree.depth[m, q])
        out.append(tuple(int(tree.tokens[m, q]) for q in path[1:]))
    return out


def test_nodes_are_the_distinct_prefixes_with_their_ancestors():
    for reverse in (False, True):
        tree = build_prefix_trees(HYPS, OWNERS, SOS, EOS, reverse)
        for m in (0, 1):
            seqs = [(h[::-1] if reverse else h) for h, o in zip(HYPS, OWNERS) if o == m]
            want = {tuple(s[:j]) for s in seqs for j in range(len(s) + 1)}
            real = [p for p in range(tree.nodes) if p == 0 or tree.depth[m, p] > 0]
            got = [_prefixes(tree, m)[p] for p in real]
            assert sorted(got) == sorted(want) and len(got) == len(set(got))
            assert tree.tokens[m, 0] == SOS and tree.depth[m, 0] == 0
            for p in real:
                assert tree.depth[m, p] == len(_prefixes(tree, m)[p])
                # ancestors: exactly the nodes whose prefix starts this one's
                for q in real:
                    pre_p, pre_q = _prefixes(tree, m)[p], _prefixes(tree, m)[q]
                    assert tree.ancestors[m, p, q] == (pre_p[:len(pre_q)] == pre_q)
            for p in set(range(tree.nodes)) - set(real):     # padding sees only itself
                assert tree.ancestors[m, p].sum() == 1 and tree.ancestors[m, p, p]
    # 6 hypotheses, 20 scored positions in all; tree 0 holds 6 prefixes incl. the root
    tree = build_prefix_trees(HYPS, OWNERS, SOS, EOS)
    assert tree.nodes == 6 and tree.rows.size == sum(len(h) + 1 for h in HYPS) == 20


def test_scores_sum_next_token_and_eos_along_each_path():
    rng = np.random.default_rng(0)
    for reverse in (False, True):
        tree = build_prefix_trees(HYPS, OWNERS, SOS, EOS, reverse)
        log_probs = rng.normal(size=(2, tree.nodes, 10)).astype(np.float32)
        got = tree.scores(log_probs, len(HYPS))
        prefixes = [_prefixes(tree, m) for m in (0, 1)]
        for i, (h, m) in enumerate(zip(HYPS, OWNERS)):
            seq = h[::-1] if reverse else h
            want = sum(float(log_probs[m, prefixes[m].index(tuple(seq[:j])), t])
                       for j, t in enumerate(list(seq) + [EOS]))
            assert abs(got[i] - want) < 1e-9, (reverse, h)


def test_decoder_tree_feeds_names_shapes_and_left_to_right_only():
    """decoder_tree.onnx's feeds: every input by name, the trees returned are the ones
    fed; without right-to-left scores each utterance gets a root-only tree."""
    enc = np.zeros((2, 7, 4), dtype=np.float64)
    feeds, left, right = decoder_tree_feeds(HYPS, OWNERS, SOS, EOS, enc)
    assert tuple(feeds) == DECODER_TREE_INPUTS
    assert feeds["encoder_out"].dtype == np.float32 and feeds["encoder_out"].shape == (2, 7, 4)
    assert np.array_equal(feeds["tokens"], left.tokens) and np.array_equal(feeds["r_ancestors"], right.ancestors)
    assert np.array_equal(right.tokens, build_prefix_trees(HYPS, OWNERS, SOS, EOS, True).tokens)
    feeds, _, right = decoder_tree_feeds(HYPS, OWNERS, SOS, EOS, enc, right_to_left=False)
    assert feeds["r_tokens"].tolist() == [[SOS], [SOS]] and feeds["r_depth"].tolist() == [[0], [0]]
    assert feeds["r_ancestors"].shape == (2, 1, 1)
