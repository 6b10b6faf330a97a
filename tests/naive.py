"""The naive reference forms every loss and metric test compares against: each one written as the papers
and open_clip write it, holding the whole B x B matrix, with nothing fused, tiled or distributed."""
import torch
import torch.nn.functional as F


def clip_loss(image, text, scale):
    """CLIP's symmetric InfoNCE: cross-entropy over the logits' rows and over their columns, averaged."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def one_way_loss(image, text, scale):
    """The image-to-text half alone (rows only), as a queue loss or a two_way=False kernel computes it."""
    logits = scale * image @ text.T
    return F.cross_entropy(logits, torch.arange(image.shape[0], device=image.device))


def sigmoid_loss(image, text, scale, bias):
    """SigLIP's pairwise loss: every pair a binary label (+1 on the diagonal), summed, over the batch size."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(logits), dtype=image.dtype, device=image.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def multi_text_loss(image, texts, scale):
    """LaCLIP-MT: CLIP's loss against each of the M text sets [B, M, D], averaged over the sets."""
    return sum(clip_loss(image, texts[:, m], scale) for m in range(texts.shape[1])) / texts.shape[1]


def recall(sims, ks=(1, 5, 10)):
    """R@k of paired rows by the definition: the pair's rank is the number of candidates scored strictly
    higher (a tie with the pair does not push it down), and it counts at k when that rank is below k."""
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        ranks = [sum(1 for j in range(s.shape[1]) if s[i, j] > s[i, i]) for i in range(s.shape[0])]
        for k in ks:
            out[f"{name}_r{k}"] = sum(r < k for r in ranks) / len(ranks)
    return out


# The same source for tests that run the references in a subprocess: exec(SOURCE) defines them there.
with open(__file__, encoding="utf-8") as _f:
    SOURCE = _f.read().split("# The same source for tests")[0]
