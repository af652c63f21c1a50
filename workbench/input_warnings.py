"""transformers' warnings for inputs that run but probably do not mean what was intended.

* ``warn_if_padded``: a batch whose rows start with the pad token, given without an ``attention_mask``
  (pad tokens are then attended to like real tokens and the logits are off).
* ``warn_past_max_positions``: positions at or beyond ``max_position_embeddings`` (the model was not
  trained there; rotary embeddings still compute, so nothing else would tell).
* ``warn_unused_sampling``: ``temperature`` / ``top_p`` / ``top_k`` passed while ``do_sample`` is off
  (generation is greedy, so they do nothing).

Example::

    warn_unused_sampling({"temperature": 1.5})      # UserWarning: `do_sample` is set to `False`. However, ...
"""

from __future__ import annotations

import warnings

SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}    # transformers' generation defaults


def warn_unused_sampling(explicit: dict, stacklevel: int = 4) -> None:
    """Warn for each sampling setting in ``explicit`` (the arguments the caller passed) that differs
    from transformers' default while sampling is off."""
    for name, default in SAMPLING_DEFAULTS.items():
        value = explicit.get(name)
        if value is not None and value != default:
            warnings.warn(f"`do_sample` is set to `False`. However, `{name}` is set to `{value}` -- this flag is only "
                          f"used in sample-based generation modes. You should set `do_sample=True` or unset `{name}`. "
                          "(Generation is greedy.)", UserWarning, stacklevel=stacklevel)


def warn_if_padded(input_ids, attention_mask, pad_token_id, stacklevel: int = 4) -> None:
    """Warn when a row of ``input_ids`` [batch pos] starts with ``pad_token_id`` and no mask is given."""
    if (attention_mask is None and pad_token_id is not None and input_ids.dim() == 2 and input_ids.shape[1] > 1
            and bool((input_ids[:, 0] == pad_token_id).any())):
        warnings.warn("We strongly recommend passing in an `attention_mask` since your input_ids may be padded: a "
                      f"row starts with the pad token id {pad_token_id}, and without a mask pad tokens are attended to "
                      "like real ones. (String inputs are padded and masked by the model itself.)", UserWarning,
                      stacklevel=stacklevel)


def warn_past_max_positions(last_position: int, max_positions: int, stacklevel: int = 4) -> None:
    """Warn (once per call site, the text does not vary) when ``last_position >= max_positions``."""
    if last_position >= max_positions:
        warnings.warn(f"position_ids reach past max_position_embeddings={max_positions} (config.json): the model was "
                      "not trained at these positions, so its outputs there may be meaningless", UserWarning,
                      stacklevel=stacklevel)
