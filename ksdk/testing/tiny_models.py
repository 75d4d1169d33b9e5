"""Tiny DeepSeek-architecture models with random weights, written as GGUF files.

They serve the tests (against a transformers reference built from the same weights), the benchmarks and the
built-in demo. The routed experts are a shared base plus a per-expert deviation: quantization then rarely
flips the router's choice, while a wrong expert index still changes the output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

__all__ = ["QTYPE_POLICIES", "TinyModelSpec", "add_metadata", "cache_dir", "random_weights", "tiny_gguf", "write_gguf"]

FORMAT_VERSION = 2  # bump when weights or layout change, so cached files are rebuilt
Q = gguf.GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Hyper-parameters of a tiny model. ``kind="v3"``: DeepSeek-V3/R1 style (q low-rank, sigmoid routing with
    bias, group-limited); ``"v2lite"``: no q low-rank, softmax greedy routing, no top-k normalization."""

    kind: Literal["v3", "v2lite"] = "v3"
    num_layers: int = 4
    num_dense_layers: int = 1
    hidden_size: int = 256
    num_heads: int = 4
    q_lora_rank: int = 256
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 64
    intermediate_size: int = 512
    moe_intermediate_size: int = 256
    num_experts: int = 16
    num_experts_per_tok: int = 4
    num_shared_experts: int = 1
    num_groups: int = 4
    topk_groups: int = 2
    routed_scaling_factor: float = 2.5
    vocab_size: int = 129280
    context_length: int = 2048  # = rope_original_context * rope_factor, as YaRN expects
    rope_theta: float = 10000.0
    rope_factor: float = 4.0
    rope_original_context: int = 512
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    seed: int = 0

    @classmethod
    def v2lite(cls, **kw: object) -> TinyModelSpec:
        base = dict(kind="v2lite", q_lora_rank=0, num_groups=1, topk_groups=1, routed_scaling_factor=1.0)
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    @property
    def sigmoid(self) -> bool:
        return self.kind == "v3"

    @property
    def norm_topk_prob(self) -> bool:
        return self.kind == "v3"

    @property
    def tag(self) -> str:
        """A short stable name for the cache file."""
        digest = hashlib.sha1(repr((FORMAT_VERSION, self)).encode()).hexdigest()[:10]
        return f"tiny-{self.kind}-{digest}"


def random_weights(spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """fp32 weights under GGUF tensor names, in torch order ([out, in]; experts [E, out, in])."""
    rng = np.random.default_rng(spec.seed)
    H, heads = spec.hidden_size, spec.num_heads
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim

    def mat(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * gain / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((spec.vocab_size, H)).astype(np.float32),
        "output_norm.weight": norm(H),
        "output.weight": mat(spec.vocab_size, H, gain=4.0),
    }
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(H)
        if spec.q_lora_rank:
            w[p + "attn_q_a.weight"] = mat(spec.q_lora_rank, H)
            w[p + "attn_q_a_norm.weight"] = norm(spec.q_lora_rank)
            w[p + "attn_q_b.weight"] = mat(heads * qk, spec.q_lora_rank, gain=2.0)
        else:
            w[p + "attn_q.weight"] = mat(heads * qk, H, gain=2.0)
        w[p + "attn_kv_a_mqa.weight"] = mat(spec.kv_lora_rank + spec.qk_rope_head_dim, H)
        w[p + "attn_kv_a_norm.weight"] = norm(spec.kv_lora_rank)
        w[p + "attn_kv_b.weight"] = mat(heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank, 2.0)
        w[p + "attn_output.weight"] = mat(H, heads * spec.v_head_dim)
        w[p + "ffn_norm.weight"] = norm(H)
        if i < spec.num_dense_layers:
            w[p + "ffn_gate.weight"] = mat(spec.intermediate_size, H)
            w[p + "ffn_up.weight"] = mat(spec.intermediate_size, H)
            w[p + "ffn_down.weight"] = mat(H, spec.intermediate_size)
            continue
        E, inter = spec.num_experts, spec.moe_intermediate_size
        w[p + "ffn_gate_inp.weight"] = mat(E, H, gain=3.0)
        if spec.sigmoid:
            w[p + "exp_probs_b.bias"] = (0.05 * rng.standard_normal(E)).astype(np.float32)
        for name, (out, inp) in {"gate": (inter, H), "up": (inter, H), "down": (H, inter)}.items():
            base = mat(out, inp)
            w[p + f"ffn_{name}_exps.weight"] = np.stack([base + 0.5 * mat(out, inp) for _ in range(E)])
        shared = inter * spec.num_shared_experts
        if shared:
            w[p + "ffn_gate_shexp.weight"] = mat(shared, H)
            w[p + "ffn_up_shexp.weight"] = mat(shared, H)
            w[p + "ffn_down_shexp.weight"] = mat(H, shared)
    return w


def split_kv_b(weights: dict[str, np.ndarray], spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """The split attn_k_b [H, rank, nope] / attn_v_b [H, v, rank] layout llama.cpp's converter writes."""
    out = {}
    for name, value in weights.items():
        if not name.endswith("attn_kv_b.weight"):
            out[name] = value
            continue
        kv_b = value.reshape(spec.num_heads, spec.qk_nope_head_dim + spec.v_head_dim, spec.kv_lora_rank)
        prefix = name[: -len("attn_kv_b.weight")]
        out[prefix + "attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, : spec.qk_nope_head_dim].transpose(0, 2, 1))
        out[prefix + "attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, spec.qk_nope_head_dim :])
    return out


def _uniform(qtype: Q) -> Callable[[str], Q]:
    return lambda name: qtype


def _q4_k_m(name: str) -> Q:
    """A Q4_K_M-like mix of Q4_K, Q5_0, Q6_K and Q8_0 tensors."""
    if name == "output.weight" or name.endswith(("ffn_down_exps.weight", "ffn_down_shexp.weight")):
        return Q.Q6_K
    if name.endswith(("attn_output.weight", "ffn_down.weight")):
        return Q.Q5_0
    if name.endswith(("attn_kv_b.weight", "attn_k_b.weight", "attn_v_b.weight", "attn_kv_a_mqa.weight")):
        return Q.Q8_0
    return Q.Q4_K


QTYPE_POLICIES: dict[str, Callable[[str], Q]] = {
    "F32": _uniform(Q.F32),
    "F16": _uniform(Q.F16),
    "BF16": _uniform(Q.BF16),
    "Q8_0": _uniform(Q.Q8_0),
    "Q4_K": _uniform(Q.Q4_K),
    "Q6_K": _uniform(Q.Q6_K),
    "Q4_K_M": _q4_k_m,
}


def _tensor_qtype(name: str, array: np.ndarray, policy: Callable[[str], Q]) -> Q:
    if array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32  # norms, biases and the router stay fp32, as real files keep them
    qtype = policy(name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F16  # rows too short for a k-quant block
    return qtype


def _encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    from ksdk.weights.quantize import quantize

    return quantize(array, qtype)


def add_metadata(writer: gguf.GGUFWriter, spec: TinyModelSpec, name: str) -> None:
    """The deepseek2 hyper-parameter keys for ``spec``, as llama.cpp's converter writes them."""
    writer.add_name(name)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_used_count(spec.num_experts_per_tok)
    writer.add_leading_dense_block_count(spec.num_dense_layers)
    if spec.q_lora_rank:
        writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    # Both the plain and the _mla keys, as current converters write them.
    writer.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    writer.add_value_length_mla(spec.v_head_dim)
    writer.add_expert_feed_forward_length(spec.moe_intermediate_size)
    writer.add_expert_count(spec.num_experts)
    writer.add_expert_shared_count(spec.num_shared_experts)
    writer.add_expert_weights_scale(spec.routed_scaling_factor)
    writer.add_expert_weights_norm(spec.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if spec.sigmoid
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_group_count(spec.num_groups)
    writer.add_expert_group_used_count(spec.topk_groups)
    writer.add_rope_dimension_count(spec.qk_rope_head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(spec.rope_factor)
    writer.add_rope_scaling_orig_ctx_len(spec.rope_original_context)
    writer.add_rope_scaling_yarn_log_mul(0.1 * spec.mscale_all_dim)


def write_gguf(path: Path, spec: TinyModelSpec, weights: dict[str, np.ndarray], qtype: str = "F32",
               *, name: str | None = None, with_tokenizer: bool = True) -> None:
    """Write ``weights`` with ``spec``'s metadata, each tensor typed by the named policy."""
    policy = QTYPE_POLICIES[qtype]
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    add_metadata(writer, spec, name or f"ksdk {spec.tag} {qtype}")
    if with_tokenizer:
        from ksdk.testing.tokenizer_data import write_tokenizer

        write_tokenizer(writer)
    for tensor_name, array in weights.items():
        tq = _tensor_qtype(tensor_name, array, policy)
        data = _encode(array, tq)
        if tq in (Q.F32, Q.F16):
            writer.add_tensor(tensor_name, data)
        else:
            writer.add_tensor(tensor_name, data, raw_shape=data.shape, raw_dtype=tq)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cache_dir() -> Path:
    """Where built models are kept: ``$KSDK_CACHE``, else ``~/.cache/ksdk``."""
    root = Path(os.environ.get("KSDK_CACHE") or Path.home() / ".cache" / "ksdk")
    root.mkdir(parents=True, exist_ok=True)
    return root


def tiny_gguf(kind: Literal["v3", "v2lite"] = "v3", qtype: str = "F32", *, kv_b: str = "joined",
              spec: TinyModelSpec | None = None, name: str | None = None) -> Path:
    """The path of a cached tiny model file, building it on first use (atomically, safe across processes)."""
    if qtype not in QTYPE_POLICIES:
        raise ValueError(f"qtype {qtype!r}: choose from {', '.join(QTYPE_POLICIES)}")
    spec = spec or (TinyModelSpec() if kind == "v3" else TinyModelSpec.v2lite())
    folder = cache_dir() / "models"
    folder.mkdir(exist_ok=True)
    stem = f"{name}-{spec.tag}" if name else spec.tag  # the tag keeps the cache keyed by spec and version
    path = folder / f"{stem}-{qtype}-{kv_b}.gguf"
    if path.exists():
        return path
    weights = random_weights(spec)
    if kv_b == "split":
        weights = split_kv_b(weights, spec)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        write_gguf(Path(tmp), spec, weights, qtype, name=name)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
