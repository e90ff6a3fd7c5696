"""Loss functions as small pure functions over tensors (docs/amess-method.md, SS).

Every SS function expects L2-normalised embeddings, so that a dot product is a cosine
similarity. `tau` is a temperature: a float or a 0-d tensor (a learned scale passes
`1 / scale`, so gradients reach the scale). Shapes: `b` rows, `C` labels, `p` the size
of the shared semantic space. Callers drop out-of-scope rows before calling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def description_ce(z: torch.Tensor, e: torch.Tensor, labels: torch.Tensor,
                   tau: float | torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row towards its gold description among all `C` (SS 4).

    z: (b, p) normalised utterance embeddings; e: (C, p) normalised description
    embeddings; labels: (b,) long in [0, C). Returns a scalar.
    """
    logits = z @ e.t() / tau  # (b, C)
    return F.cross_entropy(logits, labels)


def description_to_rows(z: torch.Tensor, e: torch.Tensor, labels: torch.Tensor,
                        tau: float | torch.Tensor) -> torch.Tensor:
    """The other direction of `description_ce` (CLIP's symmetric loss, as FLYP fine-tunes a
    classifier with it, Goyal et al. 2023): each label present in the batch scores the batch's
    rows, and its own rows are the positives.

    loss_c = -mean over rows j of label c of log softmax_j(e_c . z_j / tau), averaged over the
    labels present. z: (b, p), e: (C, p) normalised; labels: (b,) long in [0, C). Scalar.
    """
    logits = e @ z.t() / tau  # (C, b)
    present = torch.unique(labels)  # (c',) sorted
    logp = logits[present].log_softmax(dim=1)  # (c', b)
    own = labels[None, :] == present[:, None]  # (c', b)
    return (-(logp * own).sum(1) / own.sum(1)).mean()


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between two views of the same rows (SS 4: z_m against z_t).

    a, b: (n, p) normalised; row i of `a` and row i of `b` are the positive pair, every
    other row of the batch a negative. Symmetric in its two arguments. Returns a scalar.
    """
    logits = a @ b.t() / tau  # (n, n)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def supervised_infonce(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor,
                       tau: float | torch.Tensor) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, "SupCon out"): every row of `b` with
    the same label as row i of `a` is a positive of it, every other row a negative.

    a, b: (n, p) normalised; labels: (n,) long. When `a is b` (one view), a row is neither
    its own positive nor in its own denominator. loss_i = -mean over positives j of
    log softmax_j(a_i . b / tau); rows without a positive are left out; two views are
    averaged over both directions. Returns a scalar (0 when no row has a positive).
    """
    same = labels[:, None] == labels[None, :]  # (n, n)
    logits = a @ b.t() / tau
    one_view = a is b
    if one_view:
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        same = same & ~eye
        logits = logits.masked_fill(eye, float("-inf"))

    def one_way(lg: torch.Tensor) -> torch.Tensor:
        logp = lg.log_softmax(dim=1).masked_fill(~same, 0.0)
        count = same.sum(1)
        has = count > 0
        if not bool(has.any()):
            return a.sum() * 0.0
        return (-(logp.sum(1)[has] / count[has])).mean()

    return one_way(logits) if one_view else 0.5 * (one_way(logits) + one_way(logits.t()))


POSITIVES = ("self", "label")


def triplet_contrastive(z_m: torch.Tensor, z_t: torch.Tensor | None, e: torch.Tensor,
                        labels: torch.Tensor, tau: float | torch.Tensor,
                        text_view: bool = True, positives: str = "self",
                        symmetric: bool = False) -> torch.Tensor:
    """The triplet contrastive loss of SS 4: the mean of its terms.

    - z_m (b, p) against all descriptions e (C, p): cross-entropy towards the gold one;
    - z_t (b, p) against all descriptions: the same;
    - z_m against z_t within the batch: symmetric InfoNCE (`positives="self"`: row i of
      z_t is the only positive of row i of z_m), or supervised InfoNCE (`"label"`: every
      row of the same label is a positive).

    With `text_view=False` the first term remains (z_t may then be None), plus, with
    `positives="label"`, a supervised contrastive term of z_m against itself. The terms
    are averaged, not summed, so that `ss_lambda` weighs the same whether the text view
    is on or off. `symmetric=True` makes each description term the mean of its two
    directions, `description_ce` and `description_to_rows`.
    """
    if positives not in POSITIVES:
        raise ValueError(f"triplet_contrastive: positives must be one of {list(POSITIVES)}, got {positives!r}")

    def to_descriptions(z: torch.Tensor) -> torch.Tensor:
        ce = description_ce(z, e, labels, tau)
        return 0.5 * (ce + description_to_rows(z, e, labels, tau)) if symmetric else ce

    terms = [to_descriptions(z_m)]
    if text_view:
        if z_t is None:
            raise ValueError("triplet_contrastive: text_view=True needs the text-only view z_t")
        terms.append(to_descriptions(z_t))
        terms.append(symmetric_infonce(z_m, z_t, tau) if positives == "self"
                     else supervised_infonce(z_m, z_t, labels, tau))
    elif positives == "label":
        terms.append(supervised_infonce(z_m, z_m, labels, tau))
    return torch.stack(terms).mean()


def margin_triplet(z_m: torch.Tensor, e: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin variant of SS 4: anchor z_m, positive e_y, the hardest negative description.

    loss_i = max(0, margin - cos(z_i, e_y) + max_{c != y} cos(z_i, e_c)), averaged over rows;
    zero once every row is closer to its own description by at least `margin`.
    z_m: (b, p) and e: (C, p) normalised; labels: (b,) long. Needs C >= 2.
    """
    sims = z_m @ e.t()  # (b, C) cosine similarities
    pos = sims.gather(1, labels[:, None]).squeeze(1)  # (b,)
    gold = F.one_hot(labels, num_classes=e.shape[0]).bool()
    neg = sims.masked_fill(gold, float("-inf")).amax(dim=1)  # (b,) hardest negative
    return F.relu(margin - pos + neg).mean()


def outlier_exposure(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of out-of-scope rows towards the uniform distribution over the in-scope
    intents (Hendrycks et al., 2019). logits: (r, C) of the OOS rows only; scalar (0 if r == 0)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -F.log_softmax(logits.float(), dim=-1).mean(dim=-1).mean()
