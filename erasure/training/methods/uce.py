"""The ``uce`` method: a closed-form edit of cross-attention's key and value projections (UCE, Gandikota et al.,
WACV 2024), instead of ESD's gradient steps.

Every ``attn2.to_k`` / ``attn2.to_v`` weight W sees the prompt only through the text encoder's token embeddings e.
The edit solves, per weight and in one least-squares step,

    W' = argmin  mean_erase ||W' e_c - W e_c0||^2  +  lambda mean_keep ||W' e_p - W e_p||^2  +  mu ||W' - W||^2

over every token position of the erase pairs (c, c0) (ESD's training prompts naming the concept, c0 naming an
anchor in its place, so both have the same tokens but one) and of the prompts kept (each c without the concept's
words, ``preserve`` prompts, word lists from the tokenizer's vocabulary that do not name the concept, the empty
prompt). lambda is ``preserve_weight``. Why: the prompts kept are held where the base has them in the objective
itself, not only where gradient steps happen to leave them; how close that holds them depends on how well the text
encoder separates the erased prompts from the kept ones (the toy world's figures: docs/history.md).

Example:
    >>> cfg = ESDConfig(concepts=["red"], method="uce", anchor=["green", "blue"], templates=["toy"])
    >>> trainer = ESDTrainer(pipe, cfg)
    >>> residual = edit_in_closed_form(trainer)     # the trainable tensors now hold W'
    >>> trainer.delta()                             # what the pack stores
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidArgumentError
from ...prompts import names_any, vocabulary_words, without
from .esd import keys_and_values
from .registry import Method, register_method

RIDGE = 1e-3  # mu: keeps the solve well-posed along directions no prompt's embedding spans
KEPT_WORDS = 15  # the longest vocabulary word list kept (attackers send long lists)
ROBUST_TERMS = ("guided_weight", "unnamed_weight", "adversarial_every")  # ESD training terms an edit has no use for


class UCEOptions(BaseModel):
    """Options of method uce (``ESDConfig.method_options``)."""

    model_config = ConfigDict(extra="forbid")
    edit_prompts: int = Field(1000, gt=0, description="erase prompts drawn per concept, and as many vocabulary word "
                              "lists kept")


def check(config) -> None:
    """UCE maps the concept onto an anchor in the same token position, and trains nothing."""
    if not config.anchor:
        raise ValueError("method uce maps the concept onto an anchor in the same token position: give --anchor "
                         "CONCEPT (e.g. a sibling)")
    robust = [f for f in ROBUST_TERMS if getattr(config, f)]
    if robust:
        raise ValueError(f"method uce is a closed-form edit, not trained: it adds no robust term "
                         f"({', '.join(robust)}); drop them or choose an esd method")


def draw_edit_prompts(trainer) -> tuple[list[str], list[str], list[str]]:
    """(erased c, their anchored c0 with the same token count, kept prompts), ``edit_prompts`` of each per concept."""
    cfg, rng, tokenizer = trainer.cfg, trainer.rng, trainer.pipe.tokenizer
    n_prompts = cfg.method_options.edit_prompts

    def length(prompt: str) -> int:
        return len(tokenizer(prompt).input_ids)

    erased, anchored, kept = [], [], [""]
    vocabulary = vocabulary_words(tokenizer)
    for concept in cfg.concepts:
        pairs = [(c, c0) for c, c0 in trainer.prompts(concept, n_prompts) if length(c) == length(c0)]
        if len(pairs) < n_prompts // 2:
            raise InvalidArgumentError(f"--method uce: only {len(pairs)} of {n_prompts} prompts naming "
                                       f"{concept!r} keep their token count with an anchor in its place; give "
                                       "anchors and synonyms of one token each")
        erased += [c for c, _ in pairs]
        anchored += [c0 for _, c0 in pairs]
        words = trainer.concept_words(concept)
        kept += [without(c, words) for c, _ in pairs]  # the erase set's grammar naming nothing: the base's colour
        if cfg.preserve:
            kept += trainer.preserve_prompts(pairs, concept)
        others = [w for w in vocabulary if not names_any(w, words)]
        for _ in range(n_prompts):
            n = int(rng.integers(1, KEPT_WORDS + 1))
            kept.append(" ".join(others[int(i)] for i in rng.integers(len(others), size=n)))
    return erased, anchored, kept


def edit_in_closed_form(trainer) -> float:
    """Write W' into every trainable ``to_k`` / ``to_v`` weight of ``trainer``; returns the mean relative residual of
    the erase pairs (0: every erased prompt's keys and values are exactly its anchor's)."""
    import torch  # here, not above: the method registry stays torch-free for `erasure train --help`

    cfg = trainer.cfg
    t0 = time.perf_counter()
    erased, anchored, kept = draw_edit_prompts(trainer)
    with torch.no_grad():
        # Only Gram matrices of the token embeddings are needed (D x D), accumulated a chunk of prompts at a time.
        s_cc, s_c0c, s_c0c0 = (_gram(trainer, a, b) for a, b in ((erased, erased), (anchored, erased),
                                                                 (anchored, anchored)))
        s_pp = _gram(trainer, kept, kept)
        w_c, w_p = 1.0 / len(erased), cfg.preserve_weight / len(kept)
        eye = torch.eye(s_cc.shape[0], dtype=s_cc.dtype, device=s_cc.device)
        inverse = torch.linalg.inv(w_c * s_cc + w_p * s_pp + RIDGE * eye)
        residuals = []
        for param in trainer.trainable.values():
            if param.dim() != 2:  # a projection's bias, where a base has one, does not see the text
                continue
            w = param.detach().double()
            edited = (w_c * w @ s_c0c + w_p * w @ s_pp + RIDGE * w) @ inverse
            # ||e_c W'^T - e_c0 W^T||^2 / ||e_c0 W^T||^2 from the Gram matrices
            target = torch.trace(w @ s_c0c0 @ w.T)
            error = torch.trace(edited @ s_cc @ edited.T) - 2 * torch.trace(w @ s_c0c @ edited.T) + target
            residuals.append(float(error.clamp(min=0).sqrt() / target.sqrt()))
            param.copy_(edited.to(param.dtype))
    trainer.losses.append(float(np.mean(residuals)))
    trainer.train_seconds += time.perf_counter() - t0
    return trainer.losses[-1]


def _gram(trainer, a: list[str], b: list[str], chunk: int = 256):
    """sum over every token position of e_a e_b^T (D x D, float64) for the prompt lists ``a`` and ``b`` (same
    length; b's tokens at a's positions)."""
    total = None
    for i in range(0, len(a), chunk):
        e_a = trainer.conditioner.hidden_states(a[i:i + chunk]).flatten(0, 1).double()
        e_b = e_a if a is b else trainer.conditioner.hidden_states(b[i:i + chunk]).flatten(0, 1).double()
        part = e_a.T @ e_b
        total = part if total is None else total + part
    return total


UCE = register_method(Method(
    "uce", "cross-attention's keys and values, edited in closed form (not trained)", keys_and_values,
    card="""UCE's closed-form edit of cross-attention's keys and values ({{ options.edit_prompts }}
prompts per concept)""", options=UCEOptions, check=check, edit=edit_in_closed_form))
