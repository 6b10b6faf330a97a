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


def distill_loss(image, text, scale, teacher_image, teacher_text, teacher_scale):
    """open_clip's DistillClipLoss distillation term: the soft cross-entropy of the student's softmax
    against the teacher's (a list of teachers: their softmaxes averaged), rows and columns, averaged."""
    if isinstance(teacher_image, torch.Tensor):
        teacher_image, teacher_text, teacher_scale = [teacher_image], [teacher_text], [teacher_scale]
    s = scale * image @ text.T
    ts = [c * u @ w.T for u, w, c in zip(teacher_image, teacher_text, teacher_scale)]
    p_rows = sum(t.softmax(1) for t in ts) / len(ts)
    p_cols = sum(t.T.softmax(1) for t in ts) / len(ts)
    soft = lambda p, s: -(p * s.log_softmax(1)).sum(1).mean()  # noqa: E731
    return (soft(p_rows, s) + soft(p_cols, s.T)) / 2


def distill_sigmoid_loss(image, text, scale, bias, teacher_image, teacher_text, teacher_scale, teacher_bias):
    """A SigLIP student's distillation term: the sigmoid loss with soft labels 2 x mean sigmoid(teacher) - 1."""
    if isinstance(teacher_image, torch.Tensor):
        teacher_image, teacher_text, teacher_scale, teacher_bias = [teacher_image], [teacher_text], [teacher_scale], [teacher_bias]
    s = scale * image @ text.T + bias
    p = sum(torch.sigmoid(c * u @ w.T + b) for u, w, c, b in zip(teacher_image, teacher_text, teacher_scale, teacher_bias))
    labels = 2 * p / len(teacher_image) - 1
    return -F.logsigmoid(labels * s).sum() / len(s)


# The same source for tests that run the references in a subprocess: exec(SOURCE) defines them there.
with open(__file__, encoding="utf-8") as _f:
    SOURCE = _f.read().split("# The same source for tests")[0]


def substr_matching(text, entries):
    """MetaCLIP's matching as its first release wrote it: the caption spaced (padded, , . ; : ? ! ` wrapped
    in spaces, tabs and line breaks made spaces), then every entry, padded with a space each side, looked
    for in it; the ids of those found. One pass over the caption per entry."""
    spaced = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        spaced = spaced.replace(c, " ")
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


def long_clip_pca(x, k):
    """Long-CLIP's coarse image features as its training code computes them, on one process holding the
    whole batch: the covariance's eigen-decomposition (torch.linalg.eig, real parts), the eigenvectors
    sorted by eigenvalue, x centred, projected on the top k and back, the mean added."""
    mean = x.mean(0)
    centred = x - mean
    values, vectors = torch.linalg.eig(centred.T @ centred)
    top = vectors.real[:, values.real.argsort(descending=True)][:, :k]
    return centred @ top @ top.T + mean
