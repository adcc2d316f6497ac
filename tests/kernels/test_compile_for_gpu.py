"""The kernels compile for Ampere (sm_80) and Hopper (sm_90) without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts some programs the compiler
rejects (loop-carried type changes, unsupported ops). Here a fresh process, without
TRITON_INTERPRET, lowers every kernel variant (the three logits-in kernels and the two fused linear
ones, three dtypes, the constexpr switches) to PTX and assembles it with the ptxas bundled in the triton wheel, with the 16-byte divisibility hints a real launch on V = 152,064 gets, and
checks that the logits are read and dlogits written with 16-byte vector instructions.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import itertools, json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from megatron_selfjudge.kernels import _triton_kernels as K

    FLOATS = {"inv_temp", "eps_low", "eps_high", "dual_clip", "beta_kl", "logratio_clamp", "kl_clamp"}
    TILE = ("h_ptr", "w_ptr")  # the fused linear kernels' operands, in the run's dtype
    POINTERS = {"targets_ptr": "*i64", "valid_ptr": "*i1"}

    def build(fn, constexprs, capability, dtype="*bf16"):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("logits_ptr", "grad_ptr") + TILE:
                signature[name] = dtype
            elif name.endswith("_ptr"):
                signature[name] = POINTERS.get(name, "*fp32")
            else:
                signature[name] = "fp32" if name in FLOATS else "i32"
        # What a launch on V = 152,064 (and its TP shards) gets: 16-divisible pointers, strides, V.
        aligned = [n for n in fn.arg_names
                   if n.endswith("_ptr") or n in ("row_stride", "grad_stride", "h_stride", "w_stride", "V", "H")]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
        ptx = kernel.asm["ptx"]
        return {"kernel": fn.__name__, "sm": capability, "dtype": dtype, "cubin_bytes": len(kernel.asm["cubin"]),
                "vector_loads": "ld.global.v4.b32" in ptx, "vector_stores": "st.global.v4.b32" in ptx,
                "hopper_only": bool(re.search(r"wgmma|cp\\.async\\.bulk|mbarrier|setmaxnreg", ptx))}

    out = []
    for capability in (80, 90):
        for dtype, flag in itertools.product(("*bf16", "*fp16", "*fp32"), (False, True)):
            out.append(build(K.row_stats_kernel, {"BLOCK_V": 4096, "HAS_VALID": not flag, "WITH_ENTROPY": flag},
                             capability, dtype))
            grads = {"HAS_G_LOSS": True, "HAS_G_LOGP": flag, "HAS_G_KL": flag, "HAS_G_ENT": flag}
            out.append(build(K.row_grad_kernel, {"BLOCK_V": 4096, **grads}, capability, dtype))
        for flag in (False, True):
            out.append(build(K.token_loss_kernel, {"BLOCK_N": 128, "HAS_VALID": True, "WITH_LOSS": True,
                                                   "HAS_OLD": flag, "HAS_REF": flag}, capability))
        out.append(build(K.token_loss_kernel, {"BLOCK_N": 128, "HAS_VALID": False, "WITH_LOSS": False,
                                               "HAS_OLD": False, "HAS_REF": False}, capability))
        for dtype in ("*bf16", "*fp16", "*fp32"):
            tiles = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "DOT_FP32": False, "IEEE": dtype == "*fp32"}
            out.append(build(K.linear_row_stats_kernel, {**tiles, "HAS_VALID": True, "WITH_ENTROPY": True},
                             capability, dtype))
            grads = {"HAS_G_LOSS": True, "HAS_G_LOGP": True, "HAS_G_KL": True, "HAS_G_ENT": True}
            out.append(build(K.linear_dlogits_kernel, {**tiles, **grads}, capability, dtype))
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_with_vector_memory_access():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    builds = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(builds) == 42
    for build in builds:
        assert build["cubin_bytes"] > 0, build
        linear = build["kernel"].startswith("linear_")
        # The default path must run on sm_80; for sm_90 Triton lowers tl.dot to wgmma itself.
        assert not build["hopper_only"] or (linear and build["sm"] == 90), build
        if linear:
            continue
        if build["kernel"] != "token_loss_kernel":
            assert build["vector_loads"], build  # 16-byte loads of the logits
        if build["kernel"] == "row_grad_kernel":
            assert build["vector_stores"], build
