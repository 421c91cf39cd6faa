"""Param groups for Muon with an AdamW companion: Muon takes 2-D matrices only, and even
among those, the embeddings and the output head train better with AdamW (Jordan et al. 2024;
Moonshot's "Muon is Scalable for LLM Training")."""

from __future__ import annotations

import inspect

import torch

#: module types whose weights are lookup tables, not linear maps: AdamW's
EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def muon_param_groups(model: torch.nn.Module, *, adamw_lr: float = 3e-4,
                      adamw_betas: tuple[float, float] | None = None,
                      adamw_weight_decay: float | None = None,
                      head: str | list[str] | None = None,
                      **muon_options) -> tuple[list[dict], list[dict]]:
    """Split ``model``'s trainable params into Muon's and AdamW's: ``(muon_groups,
    adamw_groups)``, each a list of at most one param group, for ``fastopt.torch.Muon`` and
    ``fastopt.torch.AdamW`` (or torch.optim's)::

        muon_groups, adamw_groups = fot.muon_param_groups(model, lr=0.02, adamw_lr=3e-4)
        optimizers = [fot.Muon(muon_groups), fot.AdamW(adamw_groups)]

    The rule: a param goes to Muon if it is 2-D, is not the weight of an ``nn.Embedding`` or
    ``nn.EmbeddingBag``, does not belong to the output head, and is not tied to a param of
    either (a tied weight is one tensor: it goes to AdamW once). Everything else goes to
    AdamW: biases, norms' weights, embeddings, the head, and tensors of other ranks
    (convolution kernels too: torch's Muon refuses them). The output head is the modules
    named by ``head`` (names as ``model.named_modules()`` gives them), by default the last
    ``nn.Linear`` registered in ``model`` (GPT-2's ``lm_head``, a classifier's ``fc``). A
    model whose output is computed without a module of its own (nanoGPT's ``F.linear`` on
    the tied embedding) has none: pass ``head=[]``, or the last Linear (a hidden layer then)
    goes to AdamW.
    Params that do not require a gradient are left out.

    ``muon_options`` (``lr``, ``weight_decay``, ``momentum``, ...: Muon's arguments; others
    raise ``ValueError``) go into the Muon group, ``adamw_lr`` into the AdamW group's
    ``lr``, and ``adamw_betas``/``adamw_weight_decay`` into its ``betas``/``weight_decay``
    where given (else the AdamW optimizer's defaults apply). A side with no params gets an
    empty list (an optimizer needs at least one param: build only the ones you have).
    """
    from .optim import Muon

    known = set(inspect.signature(Muon).parameters) - {"params"}
    unknown = sorted(set(muon_options) - known)
    if unknown:
        raise ValueError(f"muon_param_groups: {unknown} are not arguments of Muon "
                         f"({sorted(known)})")
    modules = dict(model.named_modules())
    if head is None:  # (exactly nn.Linear: attention's out_proj, a subclass, is no head)
        linears = [name for name, m in modules.items() if type(m) is torch.nn.Linear]
        heads = linears[-1:]
    else:
        heads = [head] if isinstance(head, str) else list(head)
        unknown = [name for name in heads if name not in modules]
        if unknown:
            raise ValueError(f"head: no module named {unknown} in the model (names as "
                             "model.named_modules() gives them)")
    to_adamw = {id(p) for name, m in modules.items()
                if isinstance(m, EMBEDDINGS) or name in heads for p in m.parameters()}
    muon, adamw, seen = [], [], set()
    for p in model.parameters():  # (each tensor once, tied ones included)
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (muon if p.ndim == 2 and id(p) not in to_adamw else adamw).append(p)
    muon_groups = [{"params": muon, **muon_options}] if muon else []
    adamw_options = {"lr": adamw_lr, "betas": adamw_betas, "weight_decay": adamw_weight_decay}
    adamw_groups = [{"params": adamw, **{k: v for k, v in adamw_options.items()
                                         if v is not None}}] if adamw else []
    return muon_groups, adamw_groups
