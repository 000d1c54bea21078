"""Triton fused dequantize-and-multiply for MatQuant slices: y = x · W_rᵀ for small batches (GEMV / small GEMM).

One kernel serves every precision r (constexpr) and every slicing mode, reading the uint8 master codes [out, in].

Dequantization is the affine form of `cpu.slice_params`: W = q_r·A + B with per-group A = α·2^s and
B = α·(c − z) (c = bucket centre (2^s−1)/2 for ``nested``, 0 for ``paper``), so the paper-mode slice is
α·2^(8−r)·(q_r − z/2^(8−r)) and nested adds the bucket centre. The paper rounding carry is computed from the
top r+1 bits in the kernel. Activations fp16 or bf16 (fp32 accumulation); the weight is rounded to the activation
dtype before the product, exactly like the reference (dequantize to x.dtype, then F.linear).

Importing this module needs triton. Kernels run on CUDA tensors, or on CPU tensors when the environment variable
``TRITON_INTERPRET=1`` was set before triton was imported (the test suite does this).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # any r works; the served set is {2, 3, 4, 6, 8}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_MODES = ("paper", "nested", "extra")
MAX_BATCH = 16  # above this the dispatcher uses dequantize + dense matmul (prefill)
MODE_ID = {"nested": 0, "paper": 1, "extra": 2}
# Optional tuned configs, loaded at import: MATQUANT_TRITON_CONFIGS=path/to/tuned.json (see load_configs).


@triton.jit
def _matquant_mm_kernel(
    x_ptr, codes_ptr, a_ptr, b_ptr, y_ptr,
    M, N, K, N_GROUPS, stride_xm, stride_ym,
    GROUP_SIZE: tl.constexpr, MASTER_BITS: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    ONE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_n[:, None] & mask_k[None, :]
        t = tl.load(codes_ptr + offs_n[:, None] * K + offs_k[None, :], mask=wmask, other=0).to(tl.int32)
        # -- slice to r bits --
        if MODE == 0:
            q = t >> (MASTER_BITS - BITS)
        else:
            q = ((t >> (MASTER_BITS - BITS - 1)) + 1) >> 1
            if MODE == 1:
                q = tl.minimum(q, (1 << BITS) - 1)
        # -- dequantize: W = q·A + B with per-group A, B --
        if ONE_GROUP:
            g = k0 // GROUP_SIZE
            a = tl.load(a_ptr + offs_n * N_GROUPS + g, mask=mask_n, other=0.0)[:, None]
            b = tl.load(b_ptr + offs_n * N_GROUPS + g, mask=mask_n, other=0.0)[:, None]
        else:
            gidx = offs_n[:, None] * N_GROUPS + (offs_k // GROUP_SIZE)[None, :]
            a = tl.load(a_ptr + gidx, mask=wmask, other=0.0)
            b = tl.load(b_ptr + gidx, mask=wmask, other=0.0)
        w = (q.to(tl.float32) * a + b).to(x.dtype)
        if USE_DOT:
            if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong; bf16 -> fp32 is exact, so same math
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ymask)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    use_dot: bool
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def default_config(m: int, group_size: int) -> KernelConfig:
    """Heuristic launch config (a GPU autotune may replace it; see lab/benchmarks/bench_kernels_gpu.py)."""
    bk = 64 if group_size % 64 == 0 else (32 if group_size % 32 == 0 else 64)
    if m <= 4:
        return KernelConfig(block_m=triton.next_power_of_2(max(m, 1)), block_n=32, block_k=bk, use_dot=False)
    return KernelConfig(block_m=16, block_n=32, block_k=bk, use_dot=True)


TUNED: dict[str, KernelConfig] = {}  # filled by load_configs (e.g. from lab/benchmarks/bench_kernels_gpu.py --tune-cache)


def batch_bucket(m: int) -> int:
    return 1 if m <= 1 else (4 if m <= 4 else 16)


def config_key(out_features: int, in_features: int, m: int, bits: int, mode: str, layout: str, group_size: int) -> str:
    return f"{out_features}x{in_features}|{batch_bucket(m)}|{bits}|{mode}|{layout}|{group_size}"


def load_configs(path: str) -> int:
    """Load tuned launch configs (JSON {key: KernelConfig fields}, as written by the GPU benchmark's
    --tune-cache); returns how many. Keys: `config_key`. Unknown shapes keep the heuristic `default_config`."""
    import json

    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{key: config}}, got {type(raw).__name__}.")
    try:
        loaded = {k: KernelConfig(**v) for k, v in raw.items()}
    except TypeError as e:
        raise ValueError(f"{path}: not a tuned-config file ({e}).") from None
    TUNED.update(loaded)
    return len(loaded)


def check_supported(x: torch.Tensor, bits: int, mode: str, group_size: int) -> str | None:
    """None if the kernel handles this call, else the reason it does not (the dispatcher falls back)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype} (kernel takes float16/bfloat16)"
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return f"device {x.device} (kernel needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
    if mode not in SUPPORTED_MODES:
        return f"slicing mode {mode!r}"
    if bits not in SUPPORTED_BITS:
        return f"{bits} bits"
    if group_size < 16:
        return f"group size {group_size} < 16"
    return None


def matmul(x: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, master_bits: int,
           bits: int, mode: str, group_size: int, config: KernelConfig | None = None) -> torch.Tensor:
    """y = x · W_rᵀ ([..., in] → [..., out], x.dtype). `a`, `b`: fp32 [out, n_groups] from `cpu.slice_params`."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n, k = codes.shape
    data = codes if codes.is_contiguous() else codes.contiguous()
    if k != in_features:
        raise ValueError(f"input has {in_features} features but the weight has {k}.")
    mode_id = 0 if bits == master_bits else MODE_ID[mode]
    if config is None and TUNED:
        config = TUNED.get(config_key(n, k, m, bits, mode, "master", group_size))
        if config is not None and config.block_m < m:
            config = None
    cfg = config or default_config(m, group_size)
    out_dtype = torch.float32 if cfg.split_k > 1 else x.dtype
    y = (torch.zeros if cfg.split_k > 1 else torch.empty)((m, n), device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    _matquant_mm_kernel[grid](
        x2, data, a, b, y, m, n, k, a.shape[1], x2.stride(0), y.stride(0),
        GROUP_SIZE=group_size, MASTER_BITS=master_bits, BITS=bits, MODE=mode_id, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
        SPLIT_K=cfg.split_k, DOT_F32=INTERPRET and x.dtype == torch.bfloat16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def compile_for_gpu(dtype: torch.dtype, bits: int, mode: str, group_size: int, config: KernelConfig,
                    master_bits: int = 8, arch: int = 90):
    """Compile (no launch, no GPU needed) the kernel for one specialisation to a CUDA cubin for `arch`
    (90 = H100/H200). Used by the tests to check that every variant lowers for the GPU, not only interprets."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = _matquant_mm_kernel
    if not isinstance(fn, JITFunction):  # TRITON_INTERPRET=1 wraps it; compile the plain function
        fn = JITFunction(fn.fn)
    dt = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    sig = {"x_ptr": f"*{dt}", "codes_ptr": "*u8", "a_ptr": "*fp32", "b_ptr": "*fp32",
           "y_ptr": "*fp32" if config.split_k > 1 else f"*{dt}"}
    sig.update(dict.fromkeys(["M", "N", "K", "N_GROUPS", "stride_xm", "stride_ym"], "i32"))
    constexprs = dict(GROUP_SIZE=group_size, MASTER_BITS=master_bits, BITS=bits,
                      MODE=0 if bits == master_bits else MODE_ID[mode], BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.use_dot,
                      SPLIT_K=config.split_k, DOT_F32=False)
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


if os.environ.get("MATQUANT_TRITON_CONFIGS"):
    load_configs(os.environ["MATQUANT_TRITON_CONFIGS"])
