"""The model with native CPU experts against the torch experts path on the same file.

The native kernels quantize activations (Q8_K/Q8_0), so greedy runs drift apart on a chaotic random model
(DESIGN.md §7: llama.cpp agrees with the dequantized reference on ~89% of teacher-forced tokens on such
files). Expected here: logits cosine ≥ 0.998 on average and ≥ 0.99 everywhere (an occasional flipped expert
choice costs a little), and ≥ 80% teacher-forced top-1 agreement.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ksdk.models import DeepseekForCausalLM, load_model
from ksdk.offload.native import native_available
from ksdk.offload.routed import NativeRoutedExperts
from ksdk.testing import tiny_gguf
from ksdk.testing.greedy import greedy_generate, prefill_logits
from ksdk.weights.gguf_file import GGUFFile

from .conftest import PROMPTS

pytestmark = pytest.mark.skipif(not native_available(), reason="ksdk._native not built")


@functools.cache
def model(qtype: str, experts: str) -> DeepseekForCausalLM:
    return load_model(GGUFFile.open(tiny_gguf("v3", qtype)), experts=experts)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_native_experts_track_the_torch_path(qtype: str) -> None:
    native, torch_path = model(qtype, "native"), model(qtype, "torch")
    assert isinstance(native.layers[-1].ffn.experts, NativeRoutedExperts)
    ids = PROMPTS[1]
    continuation = greedy_generate(torch_path, ids, 16)
    seq = ids + continuation
    agree, cosines = 0, []
    for n in range(len(ids), len(seq)):
        a, b = prefill_logits(torch_path, seq[:n]), prefill_logits(native, seq[:n])
        cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
        agree += int(a.argmax() == b.argmax())
    assert min(cosines) >= 0.99 and sum(cosines) / len(cosines) >= 0.998
    assert agree / len(continuation) >= 0.8


def test_auto_picks_native_for_kernel_types_and_torch_otherwise() -> None:
    assert isinstance(model("Q8_0", "auto").layers[-1].ffn.experts, NativeRoutedExperts)
    assert not isinstance(model("F32", "auto").layers[-1].ffn.experts, NativeRoutedExperts)  # no F32 kernel


def test_unknown_backend_is_refused() -> None:
    from ksdk.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="experts='gpu'"):
        load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), experts="gpu")


def test_experts_copied_to_ram_give_the_same_logits() -> None:
    from ksdk.offload import ExpertOptions

    in_ram = load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), experts=ExpertOptions("native", threads=1, memory="ram"))
    mapped = load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), experts=ExpertOptions("native", threads=1))
    ids = PROMPTS[0]
    assert torch.equal(prefill_logits(in_ram, ids), prefill_logits(mapped, ids))


@pytest.mark.parametrize("options", [dict(backend="gpu"), dict(threads=0), dict(memory="swap")])
def test_bad_expert_options_are_refused(options: dict) -> None:
    from ksdk.errors import InvalidRequestError
    from ksdk.offload import ExpertOptions

    with pytest.raises(InvalidRequestError, match=next(iter(options.values())).__repr__()):
        ExpertOptions(**options)
