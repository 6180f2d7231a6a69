"""Triton kernels for bitkern: sign packing and the multi-base XNOR-popcount convolution.

Layouts and bit conventions follow docs/architecture.md: int64 words, channel c in word c // 64,
bit c % 64, bit 1 = +1. The kernels run on CUDA devices and, with TRITON_INTERPRET=1, on CPU tensors
(that is how they are tested on machines without a GPU).

Popcount: SWAR bit arithmetic on uint64 (logical shifts; Triton's shifts on int64 are arithmetic, so
the words are bitcast to uint64 first). The same code runs in the interpreter and on a GPU, where LLVM
recognises the pattern and emits one popc.b64 per word (checked in the PTX for sm_80 / sm_90 by
tests/test_triton_backend.py).
"""
import triton
import triton.language as tl

MODE_SIGN = 0
MODE_HV = 1


@triton.jit
def _popcount64(w):
    """Number of set bits of each int64 word (result int32)."""
    u = w.to(tl.uint64, bitcast=True)
    m1 = tl.full(u.shape, 0x5555555555555555, tl.uint64)
    m2 = tl.full(u.shape, 0x3333333333333333, tl.uint64)
    m4 = tl.full(u.shape, 0x0F0F0F0F0F0F0F0F, tl.uint64)
    h01 = tl.full(u.shape, 0x0101010101010101, tl.uint64)
    u = u - ((u >> 1) & m1)
    u = (u & m2) + ((u >> 2) & m2)
    u = (u + (u >> 4)) & m4
    return ((u * h01) >> 56).to(tl.int32)


@triton.jit
def _rounded_mul(a, b):
    """a * b rounded to float32 as its own operation (never contracted with a following add into an FMA).

    On a GPU Triton lets LLVM fuse a multiply-add by default (enable_fp_fusion), which rounds once
    instead of twice and breaks bit equality with the CPU / torch backends; an explicitly rounded PTX
    mul.rn.f32 is opaque to that. The interpreter rounds every numpy operation anyway.
    """
    if _GPU_ASM:
        a, b = tl.broadcast(a, b)
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def pack_signs_kernel(
    x_ptr, v_ptr, out_ptr,
    P, C, HW, KW_WORDS,
    MODE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """x float [L, C, HW] -> out int64 [NV, L, HW, KW_WORDS], one program per (positions, word, shift).

    P = L * HW positions; program axis 2 picks the shift v[n] (mode "hv": bit = fl32(x + v) >= 0.5;
    mode "sign": bit = x >= 0, v unused).
    """
    pid_p = tl.program_id(0)
    word = tl.program_id(1)
    n = tl.program_id(2)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    bits = tl.arange(0, 64)
    chan = word * 64 + bits
    lead = offs_p // HW
    pix = offs_p % HW
    p_ok = offs_p < P
    ok = p_ok[:, None] & (chan < C)[None, :]
    src = x_ptr + (lead * C * HW + pix)[:, None] + (chan * HW)[None, :]
    x = tl.load(src, mask=ok, other=0.0)
    if MODE == 1:  # the sum in float32, as the reference H_v does
        v = tl.load(v_ptr + n).to(tl.float32)
        plus = (x.to(tl.float32) + v) >= 0.5
    else:  # compare in the input dtype: a tiny negative float64 must not round to -0.0 first
        plus = x >= 0
    plus = plus & ok  # unused high bits of the last word stay 0
    # distinct powers of two never carry, so their sum is their bitwise OR (the 1 << 63 term included)
    shifted = plus.to(tl.int64) << bits.to(tl.int64)[None, :]
    packed = tl.sum(shifted, axis=1)
    dst = out_ptr + (n * P + offs_p) * KW_WORDS + word
    tl.store(dst, packed, mask=p_ok)


@triton.jit
def mbn_conv_kernel(
    xp_ptr, w_ptr, alpha_ptr, beta_ptr, out_ptr, pairs_ptr,
    B, H, W, C, KW_WORDS, CO, OH, OW,
    M, N, KH, KW, SH, SW, PH, PW,
    WANT_OUT: tl.constexpr, WANT_PAIRS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit GEMM over packed words: rows = output positions (b, oh, ow), cols = output channels.

    xp int64 [N, B, H, W, Kw] (one packed activation per shift), w int64 [M, CO, KH, KW, Kw].
    pair count(m, n) = sum over in-bounds taps of (C - 2 * popcount(x_word ^ w_word)) summed over words
    (unused high bits are 0 in both, so they never differ). Padded taps are masked out, which is the
    same as zero padding of the +-1 convolution. Epilogue: out += fl32(alpha[m, co] * beta[n]) * count,
    summed n-outer, m-inner in float32, each product and sum rounded (_rounded_mul: no FMA contraction),
    so bit-identical to the CPU and torch backends.
    """
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    P = B * OH * OW
    # int64 offsets: pairs / activations of large layers can pass 2**31 elements
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_k = tl.arange(0, BLOCK_K)
    p_ok = offs_p < P
    co_ok = offs_co < CO
    b = offs_p // (OH * OW)
    rem = offs_p % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    out_acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    taps = KH * KW
    # Base pairs n-outer, m-inner (the contract of docs/architecture.md), rounded like the CPU engine:
    # out = sum_n sum_m fl32(alpha[m, co] * beta[n]) * count_mn, each product and sum in float32.
    for n in range(0, N):
        if WANT_OUT:
            beta = tl.load(beta_ptr + n)
        for m in range(0, M):
            count = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.int32)
            for t in range(0, taps):
                kh = t // KW
                kw = t % KW
                ih = ih0 + kh
                iw = iw0 + kw
                inb = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = ((n * B + b) * H + ih) * W + iw
                w_row = ((m * CO + offs_co) * KH + kh) * KW + kw
                pop = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.int32)
                for k0 in range(0, KW_WORDS, BLOCK_K):
                    kk = k0 + offs_k
                    k_ok = kk < KW_WORDS
                    xw = tl.load(xp_ptr + x_row[:, None] * KW_WORDS + kk[None, :],
                                 mask=inb[:, None] & k_ok[None, :], other=0)
                    ww = tl.load(w_ptr + w_row[None, :] * KW_WORDS + kk[:, None],
                                 mask=k_ok[:, None] & co_ok[None, :], other=0)  # [K, CO]
                    diff = xw[:, :, None] ^ ww[None, :, :]  # [P, K, CO]
                    pop += tl.sum(_popcount64(diff), axis=1)
                count += tl.where(inb[:, None], C - 2 * pop, 0)
            if WANT_PAIRS:
                pair_base = ((m * N + n) * B + b) * CO
                dst = (pair_base[:, None] + offs_co[None, :]) * (OH * OW) + rem[:, None]
                tl.store(pairs_ptr + dst, count, mask=p_ok[:, None] & co_ok[None, :])
            if WANT_OUT:
                alpha = tl.load(alpha_ptr + m * CO + offs_co, mask=co_ok, other=0.0)
                scale = alpha * beta  # fl32(alpha * beta), then * count, then the sum
                out_acc += _rounded_mul(scale[None, :], count.to(tl.float32))
    if WANT_OUT:
        dst = (b * CO)[:, None] * (OH * OW) + offs_co[None, :] * (OH * OW) + rem[:, None]
        tl.store(out_ptr + dst, out_acc, mask=p_ok[:, None] & co_ok[None, :])


# True when the kernels compile for a GPU (not the interpreter, which wraps them in InterpretedFunction).
_GPU_ASM = tl.constexpr(type(pack_signs_kernel).__name__ != "InterpretedFunction")


def autotune_configs():
    """Launch configurations tried by triton.autotune on a real GPU (never in the interpreter)."""
    configs = []
    for block_p, block_co, block_k, warps in [
        (64, 32, 2, 4), (128, 32, 2, 4), (64, 64, 2, 4), (128, 64, 1, 8),
        (32, 32, 4, 4), (64, 16, 4, 4), (256, 16, 1, 8), (32, 64, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_K": block_k},
                                     num_warps=warps, num_stages=2))
    return configs


mbn_conv_kernel_tuned = triton.autotune(
    configs=autotune_configs(),
    key=["C", "CO", "OH", "OW", "KH", "KW", "SH", "M", "N"],
)(mbn_conv_kernel)
