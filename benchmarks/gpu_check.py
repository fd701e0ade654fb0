"""Check the GPU path: every kernel against eager, then time and peak memory against plain SDPA.

The one command a GPU owner runs (under 5 minutes on one GPU) to verify what could not be run where
sinkscope was developed (CPU only):

1. Oracle: on tiny random models of four architectures (llama; gemma3 with sliding windows; gemma2 with
   soft-capping; gpt-oss with learned sinks), padded batches, each kernel's first-token attention against
   the same model's own eager attention weights (``output_attentions=True``) in fp32, and in bf16 against
   the eager kernel on the same bf16 inputs (every kernel computes in fp32 whatever the model's dtype, which
   transformers' bf16 eager softmax does not); max |difference| must stay below 1e-4 (fp32) / 2e-3 (bf16:
   each layer's output is rounded to bf16, and kernels that sum in different orders can round it
   differently, which the next layer's inputs then carry).
2. A bundled model (SmolLM2-135M, 1024 tokens): ``auto`` against ``eager``.
3. Speed and memory (CUDA only): the scan with ``--path auto`` (compiled flex on CUDA) and ``chunked``,
   against the decoder's plain SDPA forward, at n = 4k, 8k, 16k, 32k: time and peak-memory ratios.

On a machine without CUDA, parts 1 and 2 run on the CPU (the same logic: flex runs its reference
implementation there) and part 3 is skipped with one line.

    python benchmarks/gpu_check.py              # everything the machine can run
    python benchmarks/gpu_check.py --quick      # parts 1 and 2 only
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

TINY = {
    "llama": {},
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "query_pre_attn_scalar": 16},
    "gemma2": {"attn_logit_softcapping": 5.0, "final_logit_softcapping": None, "sliding_window": 6,
               "query_pre_attn_scalar": 16},
    "gpt_oss": {"num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": 6,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}
COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}
KERNELS = ("fused", "chunked", "flex", "eager")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-3}


def tiny(family: str, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**COMMON, **TINY[family]})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.25)
            elif name.endswith("sinks"):
                param.normal_(0.0, 1.5)
    return model.eval().to(dtype=dtype, device=device)


def first_token_attention(model: Any, ids: torch.Tensor, mask: torch.Tensor, path: str) -> torch.Tensor:
    from sinkscope.capture import FirstTokenAttention, capture

    probe = FirstTokenAttention()
    with capture(model, [probe], path=path, chunk_size=4) as engine:
        engine.forward(ids, mask)
    return torch.stack([probe.records[layer]["attention"] for layer in sorted(probe.records)])


def eager_reference(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import copy

    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    twin = twin.eval().to(dtype=next(model.parameters()).dtype, device=ids.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    first = mask.argmax(-1)
    return torch.stack([torch.stack([a[b, :, :, int(first[b])] for b in range(ids.shape[0])])
                        for a in out.attentions]).float().cpu()


def oracle(device: str) -> bool:
    ok = True
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 14), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 10:] = 0  # right padding
    real = mask.bool().cpu()[None, :, None, :]
    for dtype in (torch.float32, torch.bfloat16):
        for family in TINY:
            model = tiny(family, dtype, device)
            if dtype == torch.float32:
                reference = eager_reference(model, ids, mask)
            else:
                reference = first_token_attention(model, ids, mask, "eager")
            for path in KERNELS:
                if path == "fused" and device != "cpu":
                    continue  # the fused op is the CPU flash kernel
                got = first_token_attention(model, ids, mask, path)
                error = ((got - reference).abs() * real).max().item()
                passed = error <= TOLERANCE[dtype]
                ok &= passed
                print(f"  {str(dtype).removeprefix('torch.'):8} {family:12} {path:8} max|Δα| {error:.1e} "
                      f"{'ok' if passed else 'FAIL'}", flush=True)
    return ok


def bundled(device: str, n: int) -> bool:
    import sinkscope as ss

    try:
        lm = ss.load("smollm2-135m", device=device)
    except Exception as error:  # the package may not be installed on a GPU box
        print(f"  skipped: {error}")
        return True
    ids = torch.randint(10, 40000, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    auto = first_token_attention(lm.model, ids, mask, "auto")
    eager = first_token_attention(lm.model, ids, mask, "eager")
    error = (auto - eager).abs().max().item()
    print(f"  smollm2-135m n={n} auto vs eager max|Δα| {error:.1e} {'ok' if error <= 1e-4 else 'FAIL'}")
    return error <= 1e-4


def speed(lengths: list[int]) -> None:
    import sinkscope as ss
    from sinkscope.capture import FirstTokenAttention, capture

    lm = ss.load("smollm2-135m", device="cuda")
    model = lm.model
    print(f"  {'n':>6} {'sdpa s':>8} {'auto/sdpa time':>15} {'chunked/sdpa time':>18} {'auto/sdpa peak':>15}")
    for n in lengths:
        ids = torch.randint(10, 40000, (1, n), device="cuda")
        results = {}
        for variant in ("sdpa", "auto", "chunked"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            started = time.perf_counter()
            if variant == "sdpa":
                model.set_attn_implementation("sdpa")
                with torch.inference_mode():
                    model.base_model(input_ids=ids)
            else:
                with capture(model, [FirstTokenAttention()], path=variant) as engine:
                    engine.forward(ids)
            torch.cuda.synchronize()
            results[variant] = (time.perf_counter() - started, torch.cuda.max_memory_allocated())
        sdpa = results["sdpa"]
        print(f"  {n:>6} {sdpa[0]:>8.2f} {results['auto'][0] / sdpa[0]:>14.2f}x "
              f"{results['chunked'][0] / sdpa[0]:>17.2f}x {results['auto'][1] / sdpa[1]:>14.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the oracle checks")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}" + ("" if device == "cuda" else " (no CUDA: checking the same logic on the CPU)"))
    print("1. kernels against eager attention on tiny models")
    ok = oracle(device)
    print("2. a bundled model")
    ok &= bundled(device, 1024)
    if device != "cuda":
        print("3. speed and memory against SDPA: skipped (needs CUDA)")
    elif not args.quick:
        print("3. speed and memory against SDPA")
        speed([int(x) for x in args.lengths.split(",")])
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
