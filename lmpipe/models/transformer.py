"""A decoder-only Transformer language model (nanoGPT-style, one file, the maths in plain sight).

    x_0      = E[idx]                                   token embedding, no absolute positions
    h        = x_l + Attn(RMSNorm(x_l))                 pre-norm residual block ...
    x_{l+1}  = h + MLP(RMSNorm(h))                      ... repeated n_layer times
    logits   = RMSNorm(x_L) @ W_out^T / T               W_out = E when tie_embeddings; T: the
                                                        temperature fitted on val after training

RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * g           (no mean subtraction, no bias)

Attention (per head, d_h = d_model / n_head), with rotary position embeddings (RoPE):
    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t          (one fused `qkv` Linear)
    q_t, k_t      = RMSNorm(q_t), RMSNorm(k_t)         QK-norm (`qk_norm`), one gain vector for both
    q_t, k_t      = R(t) q_t, R(t) k_t                 R(t) rotates pair i by angle t * theta^(-2i/d_h)
    a_{t,s}       = softmax_{s <= t}( q_t . k_s / sqrt(d_h) )      causal: s <= t only
    out_t         = W_o concat_heads( sum_s a_{t,s} v_s )
  Because R(t)^T R(s) = R(s - t), the score q_t . k_s depends only on the offset s - t: RoPE
  encodes *relative* position, which is also why a key-value cache can keep absolute positions.

  Why QK-norm (as in OLMo 2, Gemma 3, modded-nanoGPT): without it a score's size is the product
  of |q| and |k|, so a sharp attention pattern must wait for W_q and W_k to grow, and in the
  default profile's 733 steps they do not: the first layers' heads stayed close to uniform
  (mean distance attended ~85 of the ~96 a uniform head gives at positions 128-255). With each
  head's q and k normalised (|q| = |k| = sqrt(d_h) times the gain), a score ranges over
  +-sqrt(d_h) * gain^2 from the first step. On the default profile (3M tokens, one run each, AMD
  EPYC) val / test bits per byte 1.943 / 2.261 with it against 1.995 / 2.286 without.

MLP: SwiGLU (Shazeer 2020),  MLP(x) = W_2 ( silu(W_g x) * (W_u x) ), W_g and W_u fused in `fc`.
  Why SwiGLU rather than GELU: at equal parameters and FLOPs (hidden width 2/3 * mlp_ratio *
  d_model, so the three matrices cost what GELU's two do) it reaches a lower loss in every
  published comparison (PaLM, LLaMA), and on a CPU the extra elementwise product is cheap next
  to the matmuls. `activation: gelu` keeps the classic GPT-2 MLP, W_2 gelu(W_1 x), for comparison.

Dropout (training only): on the embedding and on each residual branch's output, not on the
attention weights (`causal_attention` says why).

Loss: mean cross-entropy, in fp32, over the targets that are not -100 (SFT masks the prompt).

Every linear layer is a plain `nn.Linear` with a stable name (`attn.qkv`, `attn.proj`,
`mlp.fc`, `mlp.proj`, `head`) so that `peft` LoRA can target them by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.core.names import IGNORE_INDEX
from lmpipe.models.configs import TransformerConfig


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2, last dim) + eps) * weight   (Zhang & Sennrich 2019).

    Always in fp32 (the residual stream is fp32 under autocast too), cast back to the input's
    dtype. Two forms of the same formula, chosen by measurement:
      * no autograd (scoring, generation, evaluation during training) and CUDA: `F.rms_norm`,
        one call, the fastest form measured for a decode step's single vector (7.2 us against
        7.9-8.3 for the ops written out, AMD EPYC, one thread);
      * training on a CPU: `RMSNormFunction`, the same forward with its backward written out
        and the casts folded in. For QK-norm's bf16 query/key under autocast, `F.rms_norm`
        between two casts costs 6.0 ms forward + backward against 3.7 ms ([2, 8, 4, 256, 64],
        AMD EPYC Zen 5, 2 threads); the fp32 block norms cost the same either way (1.7 ms).
        The default profile's whole training step: median 368 against 390 ms.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.device.type == "cpu":
            return RMSNormFunction.apply(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype == torch.float32:   # the usual case: one call, no casts
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out. With r = 1 / sqrt(mean(x^2) + eps), n = x r,
    y = n g and upstream gradient dy (C = the normalised dim):

        dL/dg = sum over positions of dy * n
        dL/dx = r * (dy g - n * mean(dy g * n))       the second term: r depends on every x_i

    Computed in fp32 (float64 stays float64, so gradcheck applies); saves x and r only (the
    input is kept alive by the residual stream anyway), not the normalised n.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, r, weight)
        return (xf * r * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        n = x.to(r.dtype) * r
        dy = dy.to(r.dtype)
        dweight = (dy * n).flatten(0, -2).sum(0)
        dn = dy * weight
        dx = (dn - n * (dn * n).mean(-1, keepdim=True)).mul_(r)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


def rope_cos_sin(head_dim: int, length: int, theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables for positions 0..length-1, each [length, head_dim], fp32.

    angle[t, i] = t * theta^(-2i / head_dim): pair i of a head (x[i], x[i + head_dim/2])
    turns at its own frequency. Returned as cos = [cos | cos] and sin = [-sin | sin] over the
    two halves, so that `apply_rotary` is one multiply and one multiply-add.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1).float(), torch.cat((-sin, sin), -1).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every pair (x1[i], x2[i]) of the two halves of the last dim by its angle:

        (x1, x2) -> (x1 cos - x2 sin,  x2 cos + x1 sin)  =  x * [cos|cos] + [x2|x1] * [-sin|sin]

    cos/sin come from `rope_cos_sin`, shaped to broadcast against x (positions on their axis).
    """
    if cos.dtype != x.dtype:   # bf16 under autocast
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout: each element zeroed with probability p, the rest scaled by 1 / (1 - p).

    On a CPU written out with one random byte per element, u ~ U{0 .. 255}, dropped where
    u < k = round(256 p) (at least 1), and the rest scaled by 256 / (256 - k): the rate is p
    to the nearest 1/256 (0.1 -> 0.1016) and the expectation is kept exactly. Why: `F.dropout`
    draws a 32-bit Bernoulli per element, a quarter of the random numbers drawn here; on a
    residual branch of the default model ([8, 256, 256], forward + backward, AMD EPYC) 2.5 ms
    against 1.4 ms, 18 times a step. On CUDA `F.dropout` is one fused kernel and stays.
    """
    if p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    k = min(max(round(p * 256), 1), 255)
    n = x.numel()
    u = torch.randint(-2**31, 2**31, ((n + 3) // 4,), dtype=torch.int32).view(torch.uint8)
    return x.masked_fill(u[:n].view(x.shape) < k, 0.0) * (256 / (256 - k))


class KVCache:
    """Preallocated keys and values for every layer, [n_layer, B, n_head, max_len, head_dim].

    `length` is the number of positions already filled; a forward pass with the cache writes
    its T new positions at [length, length + T), attends over [0, length + T), and the model
    then advances `length`. RoPE uses the absolute positions length .. length + T - 1.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._layers = [(self.k[i], self.v[i]) for i in range(n_layer)]   # views, made once
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, d_h] at the current position; return all keys/values so far."""
        start, T = self.length, k.shape[2]
        if start + T > self.max_len:
            raise ValueError(f"KV cache overflow: {start + T} positions > max_len {self.max_len}")
        keys, values = self._layers[layer]
        # narrow + copy_ rather than tensor[l, :, :, a:b] = ...: a decode step does this 2 x
        # n_layer times, and the indexed form's Python indexing costs more than the copy
        # (2.1 against 1.6 us for one position, AMD EPYC)
        keys.narrow(2, start, T).copy_(k)
        values.narrow(2, start, T).copy_(v)
        keys, values = keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)
        if keys.dtype != k.dtype:   # a bf16 step over an fp32 cache
            keys, values = keys.to(k.dtype), values.to(v.dtype)
        return keys, values


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_h) + M) v for T queries over S >= T keys, [B, H, ., d_h].

    The queries are the last T of the S positions (S - T came before, from a KV cache), so
    M[t, s] = -inf where key s lies after query t (s > S - T + t), else 0.

    The kernel is chosen by measurement, the result is the same maths (a test checks it):
    `F.scaled_dot_product_attention` (flash kernels) everywhere, except bf16 on a CPU, where
    the three ops written out below are faster (benchmarks/train.py's model, [8, 4, 256, 64],
    AMD EPYC, 2 threads: training forward + backward 4.3 ms vs the flash kernel's 13 ms;
    scoring forward 3.4 vs 3.5 ms, and 2.8 vs 6.6 ms on one thread). The scores are then
    bf16 like every other autocast matmul; the softmax accumulates in fp32.

    No dropout on the attention weights (the model's dropout is on the embedding and the
    residual branches): drawing a mask for B x H x T x T weights cost more than the attention
    itself, and the default model without it scored the same (val / test bits per byte
    1.995 / 2.286 without, 1.985 / 2.293 with: one run each, 3M tokens).
    """
    T, S = q.shape[-2], k.shape[-2]
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        if T == 1 or T == S:   # one new query sees every key / the plain causal square
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # the matmul itself scales q k^T (alpha) and adds M (baddbmm): no pass over the scores
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    M = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(future, float("-inf"))
    scores = torch.baddbmm(M.expand(q.shape[0] * q.shape[1], T, S), q.flatten(0, 1),
                           k.flatten(0, 1).transpose(-2, -1), alpha=1.0 / math.sqrt(q.shape[-1]))
    # softmax accumulates in fp32 and returns bf16: the weights meet v in bf16 either way
    return (torch.softmax(scores, dim=-1) @ v.flatten(0, 1)).view(q.shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)   # W_q, W_k, W_v fused
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)      # W_o
        self.qk_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # one matmul for all heads of q, k, v, then heads first: [3, B, H, T, d_h]
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = qkv[:2] if self.qk_norm is None else self.qk_norm(qkv[:2])
        q, k = apply_rotary(qk, cos, sin).unbind(0)   # RoPE on q and k together
        v = qkv[2]
        if kv_cache is not None:   # attend over the cached positions too
            k, v = kv_cache.update(self.layer, k, v)
        y = causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)   # concatenate the heads
        return dropout(self.proj(y), self.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        hidden = cfg.mlp_hidden
        self.fc = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = F.silu(gate) * up                         # silu(W_g x) * (W_u x)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")    # gelu(W_1 x)
        return dropout(self.proj(h), self.dropout if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache)
        x = x + self.mlp(self.norm2(x))
        return x


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig | dict):
        super().__init__()
        cfg = config if isinstance(config, TransformerConfig) else TransformerConfig(**config)
        if cfg.vocab_size is None:
            raise ValueError("TransformerConfig.vocab_size must be set (the tokenizer's)")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # RoPE angles for every position the model can see: buffers follow .to(device), but are
        # not saved (non-persistent): they are a function of the config.
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 n_layer),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_kv_cache(self, batch: int, max_len: int | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        max_len = cfg.context_length if max_len is None else max_len
        if not 1 <= max_len <= cfg.context_length:
            raise ValueError(f"KV cache max_len {max_len} must be in [1, context_length "
                             f"{cfg.context_length}]")
        ref = self.embed.weight
        return KVCache(cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim,
                       device=ref.device if device is None else device,
                       dtype=ref.dtype if dtype is None else dtype)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token (PaLM appendix B): 6N + 12 L T d for training, a third of
        that for a forward pass. N counts the matrices (embedding lookup excluded, the head
        included); the attention term uses the full T x T scores (no causal saving)."""
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        n = sum(p.numel() for n_, p in self.named_parameters() if p.dim() == 2 and n_ != "embed.weight")
        if cfg.tie_embeddings:
            n += self.head.weight.numel()
        fwd = 2 * n + 4 * cfg.n_layer * T * cfg.d_model
        return float(3 * fwd if training else fwd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} positions exceeds context_length "
                             f"{self.config.context_length}")
        cos = self.rope_cos.narrow(0, start, T)   # [T, d_h]: positions start .. start + T - 1
        sin = self.rope_sin.narrow(0, start, T)
        x = dropout(self.embed(idx), self.config.dropout if self.training else 0.0)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.head(self.norm(x))
        if self.config.temperature is not None:   # None while training: T = 1
            logits = logits / self.config.temperature
        loss = None if targets is None else lm_loss(logits, targets)
        return logits, loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100, in fp32. A batch with no target gives 0, not NaN."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)
