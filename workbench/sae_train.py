"""A small SAE trainer (ReLU or TopK) on activations from one hook point, and the evaluation that
goes into an SAE's recorded metadata.

It is deliberately plain: activations are collected once (``collect_activations``), the SAE is
trained with Adam on mean squared error plus an L1 penalty weighted by the decoder row norms
(SAELens' standard loss; TopK needs no penalty), ``b_dec`` starts at the activations' mean, and
training runs on activations rescaled to norm sqrt(d_in), folded back into the weights at the end.
``evaluate_sae`` measures what an SAE file records: reconstruction MSE, explained variance, L0,
and the model's next-token loss clean and with the reconstruction spliced in.

Example::

    acts = collect_activations(model, tokens, "blocks.2.hook_resid_post")      # [n d_model] float32
    sae = train_sae(acts, d_sae=512, hook_name="blocks.2.hook_resid_post", steps=1500)
    evaluate_sae(model, sae, eval_tokens)     # {"mse": ..., "ce_loss_with_sae": ..., ...}
"""

from __future__ import annotations

from typing import Optional

import torch

from .sae import SAE, SAEConfig


def collect_activations(model, tokens: torch.Tensor, hook_name: str, attention_mask: Optional[torch.Tensor] = None,
                        batch_size: int = 16) -> torch.Tensor:
    """The activation at ``hook_name`` for every real (unmasked) position: ``[n d_in]`` float32."""
    rows = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start:start + batch_size]
            mask = attention_mask[start:start + batch_size] if attention_mask is not None else None
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=hook_name)
            act = cache[hook_name].float()                        # [batch pos d_in]
            rows.append(act[mask.bool()] if mask is not None else act.flatten(0, -2))
    return torch.cat(rows)


def train_sae(acts: torch.Tensor, d_sae: int, hook_name: str, architecture: str = "standard", k: Optional[int] = None,
              l1_coefficient: float = 1.0, lr: float = 3e-3, steps: int = 1500, batch_size: int = 1024,
              seed: int = 0, metadata: Optional[dict] = None) -> SAE:
    """Train an SAE on ``acts`` ``[n d_in]``; returns it in eval mode (float32).

    ``l1_coefficient`` is relative to the activations' mean squared norm (so it does not depend on
    the residual's scale); ``architecture`` "standard" (ReLU + L1) or "topk" (``k`` features)."""
    if architecture not in ("standard", "topk"):
        raise ValueError(f"architecture: expected 'standard' or 'topk', got {architecture!r}")
    g = torch.Generator().manual_seed(seed)
    n, d_in = acts.shape
    c = d_in ** 0.5 / float(acts.norm(dim=-1).mean())             # train at norm sqrt(d_in); folded in after
    acts = acts * c
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, hook_name=hook_name,
                    k=k if architecture == "topk" else None, metadata=dict(metadata or {}))
    sae = SAE(cfg)
    with torch.no_grad():
        W = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True) * 0.1)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.mean(0))
    scale = (acts - acts.mean(0)).pow(2).sum(-1).mean()           # mean squared norm of the centred data
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        batch = acts[torch.randint(0, n, (min(batch_size, n),), generator=g)]
        feats = sae.encode(batch, hooked=False)
        recons = sae.decode(feats, hooked=False)
        mse = (recons - batch).pow(2).sum(-1).mean() / scale
        loss = mse
        if architecture == "standard":
            warm = min(1.0, (step + 1) / (steps * 0.2))            # L1 warm-up over the first 20%
            loss = loss + warm * l1_coefficient * (feats * sae.W_dec.norm(dim=-1)).sum(-1).mean() / scale.sqrt()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():                                          # fold the input scaling into the weights
        sae.W_enc.mul_(c)
        sae.W_dec.div_(c)
        sae.b_dec.div_(c)
    return sae.eval()


def evaluate_sae(model, sae: SAE, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """What the SAE's file records: ``mse`` (mean over positions of the summed squared error),
    ``explained_variance``, ``l0`` (mean active features per position), ``dead_fraction``, and the
    model's next-token loss ``ce_loss_clean`` / ``ce_loss_with_sae`` (reconstruction spliced in, no error term)."""
    name = sae.cfg.hook_name
    with torch.no_grad():
        clean_loss = model(tokens, attention_mask=attention_mask, return_type="loss")
        _, cache = model.run_with_cache(tokens, attention_mask=attention_mask, names_filter=name)
        x = cache[name].float()
        x = x[attention_mask.bool()] if attention_mask is not None else x.flatten(0, -2)
        feats = sae.encode(x, hooked=False)
        recons = sae.decode(feats, hooked=False)
        err = (recons - x).pow(2).sum(-1)
        spliced_loss = model.run_with_saes(tokens, attention_mask=attention_mask, saes=[sae], use_error_term=False,
                                           return_type="loss")
    return {
        "eval_positions": int(x.shape[0]),
        "mse": float(err.mean()),
        "explained_variance": float(1 - err.sum() / (x - x.mean(0)).pow(2).sum(-1).sum()),
        "l0": float((feats > 0).float().sum(-1).mean()),
        "dead_fraction": float(((feats > 0).sum(0) == 0).float().mean()),
        "ce_loss_clean": float(clean_loss),
        "ce_loss_with_sae": float(spliced_loss),
    }
