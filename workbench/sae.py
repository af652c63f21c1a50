"""Sparse autoencoders in SAELens' folder format, without sae-lens: load, run, save.

A SAELens SAE folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae d_in]``, ``b_dec [d_in]``, and ``threshold [d_sae]`` for JumpReLU).
Both config layouts SAELens has written are read: 6.x (``architecture``, ``d_in``, ``d_sae``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k``, and
``metadata.hook_name`` ...) and earlier (``hook_name``/``hook_point`` at the top level,
``activation_fn_str`` "relu"/"topk" with ``activation_fn_kwargs.k``). Architectures: ``standard``
(ReLU), ``topk`` and ``jumprelu``; others are refused by name.

The computation is SAELens':

    sae_in   = norm_in(x) - b_dec * apply_b_dec_to_input         hook_sae_input sees x (after reshape)
    pre      = sae_in @ W_enc + b_enc                             hook_sae_acts_pre
    acts     = relu(pre) | topk(pre, k) then relu | relu(pre) * (pre > threshold)      hook_sae_acts_post
    recons   = norm_out(acts @ W_dec + b_dec)                     hook_sae_recons
    out      = recons (+ error = x - clean recons, with use_error_term)   hook_sae_error, hook_sae_output

With ``use_error_term`` and no hook changing the SAE's activations, ``out`` IS ``x`` (bit for bit;
gradients still flow through the SAE's features, as in SAELens). Splice SAEs into the model with
``model.run_with_saes`` / ``run_with_cache_with_saes`` (``workbench.sae_splice``).

Example::

    sae = SAE.load_from_disk("command-r-tiny-res-l2")         # a bundled SAE, or a folder
    logits, cache = model.run_with_cache_with_saes("The capital of France is", saes=[sae])
    cache["blocks.2.hook_resid_post.hook_sae_acts_post"]      # [batch pos d_sae]
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from .config import parse_dtype
from .hook_points import HookPoint

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output", "hook_sae_recons",
              "hook_sae_error")
_BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "saes")


@dataclass
class SAEConfig:
    """What an SAE needs to run, in SAELens' field names; ``metadata`` keeps everything else."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    hook_name: Optional[str] = None
    hook_head_index: Optional[int] = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: Optional[int] = None
    rescale_acts_by_decoder_norm: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "cfg.json") -> "SAEConfig":
        """Read SAELens 6.x or earlier ``cfg.json`` contents; bad values raise naming the field."""
        meta = dict(d.get("metadata") or d.get("meta") or {})
        arch = d.get("architecture")
        act = d.get("activation_fn", d.get("activation_fn_str"))
        k = d.get("k", (d.get("activation_fn_kwargs") or {}).get("k"))
        if arch is None:
            arch = "topk" if act == "topk" else "standard"
        if arch == "standard" and act == "topk" and k is not None:
            arch = "topk"
        if arch not in ARCHITECTURES:
            raise ValueError(f"{where}: architecture {arch!r} is not supported; expected one of {ARCHITECTURES}")
        for key in ("d_in", "d_sae"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ValueError(f"{where}: {key} must be a positive integer, got {d.get(key)!r}")
        hook_name = meta.get("hook_name", d.get("hook_name", d.get("hook_point")))
        if not isinstance(hook_name, str):
            raise ValueError(f"{where}: no hook_name (looked in metadata.hook_name, hook_name, hook_point)")
        norm = d.get("normalize_activations", "none")
        norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
        if norm not in NORMALIZATIONS:
            raise ValueError(f"{where}: normalize_activations {norm!r}; expected one of {NORMALIZATIONS}")
        if norm == "expected_average_only_in":
            warnings.warn(f"{where}: normalize_activations='expected_average_only_in' runs as 'none' (as SAELens "
                          "does when loading from disk): fold the dataset's norm scaling factor into the weights "
                          "first, or the features are mis-scaled", UserWarning, stacklevel=3)
        if arch == "topk" and (not isinstance(k, int) or k <= 0):
            raise ValueError(f"{where}: a topk SAE needs a positive integer k, got {k!r}")
        reshape = d.get("reshape_activations", "hook_z" if hook_name.endswith("hook_z") else "none")
        if reshape not in ("none", "hook_z"):
            raise ValueError(f"{where}: reshape_activations {reshape!r}; expected 'none' or 'hook_z'")
        head = meta.get("hook_head_index", d.get("hook_head_index", d.get("hook_point_head_index")))
        known = {"d_in", "d_sae", "architecture", "metadata", "meta", "hook_name", "hook_point", "k", "dtype", "device",
                 "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "activation_fn",
                 "activation_fn_str", "activation_fn_kwargs", "hook_head_index", "hook_point_head_index",
                 "rescale_acts_by_decoder_norm"}
        meta.update({key: v for key, v in d.items() if key not in known})
        return cls(d_in=d["d_in"], d_sae=d["d_sae"], architecture=arch, hook_name=hook_name, hook_head_index=head,
                   apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)), normalize_activations=norm,
                   reshape_activations=reshape, k=k if arch == "topk" else None,
                   rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm", False)),
                   dtype=str(d.get("dtype", "float32")).replace("torch.", ""), device=str(d.get("device", "cpu")),
                   metadata=meta)

    def to_dict(self) -> dict:
        """SAELens 6.x ``cfg.json`` contents."""
        meta = dict(self.metadata)
        meta.update(hook_name=self.hook_name, hook_head_index=self.hook_head_index)
        meta.setdefault("sae_lens_version", "6.0.0")      # the config layout version SAELens parses this as
        d = dict(architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae, dtype=self.dtype, device=self.device,
                 apply_b_dec_to_input=self.apply_b_dec_to_input, normalize_activations=self.normalize_activations,
                 reshape_activations=self.reshape_activations, metadata=meta)
        if self.architecture == "topk":
            d.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        return d


class SAE(nn.Module):
    """One sparse autoencoder (SAELens' inference SAE); see the module docstring.

    Example::

        sae = SAE.load_from_disk("path/to/sae_folder")
        acts = sae.encode(resid)                 # [batch pos d_sae]
        sae.decode(acts)                         # [batch pos d_in]
    """

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg, self.use_error_term = cfg, use_error_term
        dtype = parse_dtype(cfg.dtype, "dtype")
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        for name in HOOK_NAMES:
            setattr(self, name, HookPoint())
        self._norm_state: Optional[tuple] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ------------------------------------------------------------------ computation
    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            self._norm_state = (coeff,)
            return x * coeff
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            self._norm_state = (mu, std)
            return (x - mu) / (std + 1e-5)
        return x

    def _norm_out(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x / self._norm_state[0]
        if mode == "layer_norm":
            return x * self._norm_state[1] + self._norm_state[0]
        return x

    def _hook(self, name: str, t: torch.Tensor, hooked: bool) -> torch.Tensor:
        return getattr(self, name)(t) if hooked else t

    def encode(self, x: torch.Tensor, hooked: bool = True) -> torch.Tensor:
        """``[... d_in]`` -> feature activations ``[... d_sae]`` (``hooked=False`` skips the SAE's hooks)."""
        x = self._hook("hook_sae_input", x.to(self.dtype), hooked)
        sae_in = self._norm_in(x) - self.b_dec * self.cfg.apply_b_dec_to_input
        pre = self._hook("hook_sae_acts_pre", sae_in @ self.W_enc + self.b_enc, hooked)
        arch = self.cfg.architecture
        if arch == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            top = pre.topk(self.cfg.k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        elif arch == "jumprelu":
            acts = pre.relu() * (pre > self.threshold).to(pre.dtype)
        else:
            acts = pre.relu()
        return self._hook("hook_sae_acts_post", acts, hooked)

    def decode(self, acts: torch.Tensor, hooked: bool = True) -> torch.Tensor:
        """Feature activations ``[... d_sae]`` -> reconstruction ``[... d_in]``."""
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        recons = self._hook("hook_sae_recons", acts @ self.W_dec + self.b_dec, hooked)
        return self._norm_out(recons)

    def _listening(self) -> bool:
        return any(getattr(self, n).has_hooks for n in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post",
                                                         "hook_sae_recons"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's output in place of ``x`` (``[... d_in]``, or ``[... head d_head]`` for hook_z SAEs;
        with ``hook_head_index`` only that head's slice is replaced)."""
        head = self.cfg.hook_head_index
        if head is None:
            return self._splice(x)
        out = x.clone()
        out[..., head, :] = self._splice(x[..., head, :])
        return out

    def _splice(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = rearrange(x, "... h d -> ... (h d)") if self.cfg.reshape_activations == "hook_z" else x
        if flat.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE on {self.cfg.hook_name}: activation {tuple(shape)} does not have d_in="
                             f"{self.cfg.d_in} on its last axis" + (" (after flattening heads)" if flat is not x else ""))
        recons = self.decode(self.encode(flat))
        if not self.use_error_term:
            return self.hook_sae_output(recons.to(x.dtype)).reshape(shape)
        clean = recons
        if self._listening():                         # a hook may have edited the features: clean rerun
            with torch.no_grad():
                clean = self.decode(self.encode(flat, hooked=False), hooked=False)
        with torch.no_grad():
            raw_error = flat.to(self.dtype) - clean
            before = raw_error.clone() if self.hook_sae_error.has_hooks else raw_error
            error = self.hook_sae_error(raw_error)
        untouched = (clean is recons or torch.equal(clean, recons)) and error is raw_error \
            and (before is raw_error or torch.equal(before, error))
        if untouched:       # out is x itself; gradients still reach the features (SAELens' error is detached too)
            out = flat if not recons.requires_grad else flat.detach() + (recons - recons.detach()).to(flat.dtype)
        else:
            out = (recons + error).to(flat.dtype)
        return self.hook_sae_output(out).reshape(shape)

    # ------------------------------------------------------------------ files
    @classmethod
    def load_from_disk(cls, path, device: str = "cpu", dtype: Optional[str] = None) -> "SAE":
        """Load an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or a bundled SAE name
        (``bundled_saes()``). Missing or mis-shaped tensors raise naming the tensor.

        Example::

            sae = SAE.load_from_disk("command-r-tiny-res-l2")
        """
        folder = os.fspath(path)
        if not os.path.isdir(folder) and os.path.isdir(os.path.join(_BUNDLED, folder)):
            folder = os.path.join(_BUNDLED, folder)
        cfg_file, weights_file = os.path.join(folder, CFG_FILE), os.path.join(folder, WEIGHTS_FILE)
        for f in (cfg_file, weights_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} not found: an SAELens SAE folder holds {CFG_FILE} and {WEIGHTS_FILE} "
                                        f"(bundled SAEs: {bundled_saes()})")
        with open(cfg_file, encoding="utf-8") as fh:
            raw = json.load(fh)
        if dtype is not None:
            raw["dtype"] = dtype
        cfg = SAEConfig.from_dict(raw, cfg_file)
        sae = cls(cfg)
        tensors = load_file(weights_file)
        if cfg.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        expected = {n: tuple(p.shape) for n, p in sae.named_parameters()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{weights_file}: missing tensors {missing} for a {cfg.architecture} SAE")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                 f"(d_in={cfg.d_in}, d_sae={cfg.d_sae})")
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(tensors[name].to(p.dtype))
        return sae.to(device)

    def save_model(self, path, weights_dtype: Optional[torch.dtype] = None) -> None:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens 6.x layout (``weights_dtype``
        stores the tensors in another dtype, e.g. float16 to halve the file; they load back as ``cfg.dtype``)."""
        os.makedirs(path, exist_ok=True)
        tensors = {n: p.detach().to("cpu", weights_dtype or p.dtype).contiguous() for n, p in self.named_parameters()}
        save_file(tensors, os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, CFG_FILE), "w", encoding="utf-8") as fh:
            json.dump(self.cfg.to_dict(), fh, indent=2)

    def __repr__(self) -> str:
        c = self.cfg
        return f"SAE({c.architecture}, {c.hook_name}, d_in={c.d_in}, d_sae={c.d_sae}" + (f", k={c.k})" if c.k else ")")


def bundled_saes() -> list:
    """Names of the SAEs shipped in ``workbench/bundled/saes``."""
    return sorted(os.listdir(_BUNDLED)) if os.path.isdir(_BUNDLED) else []
