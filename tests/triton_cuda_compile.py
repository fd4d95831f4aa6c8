"""Compile every Triton kernel variant the wrappers launch for CUDA targets, without a GPU.

    python tests/triton_cuda_compile.py      # prints {variant: "ok" or the error} as JSON

Run as its own process by `test_triton_cuda_compile.py`: with TRITON_INTERPRET=1 (the CPU test
session) triton routes kernels through its interpreter, which the compiler cannot use.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

ARCHS = (80, 90)
"""A100 and H100/H200."""
WARP_SIZE = 32

PARTIAL_LSE = {
    "logits_ptr": "*{logits}",
    "stride_row": "i32",
    "tgt_ptr": "*i64",
    "tgt_logit_ptr": "*fp32",
    "part_max_ptr": "*fp32",
    "part_sum_ptr": "*fp32",
    "n_rows": "i32",
    "n_cols": "i32",
    "cols_per_split": "i32",
    "rows_padded": "i32",
    "BLOCK_M": "constexpr",
    "BLOCK_V": "constexpr",
}
FINISH = {
    "logits_ptr": "*{logits}",
    "stride_row": "i32",
    "grad_ptr": "*{grad}",
    "stride_grad": "i32",
    "tgt_ptr": "*i64",
    "lse_ptr": "*fp32",
    "ce_ptr": "*fp32",
    "part_max_ptr": "*fp32",
    "part_sum_ptr": "*fp32",
    "n_rows": "i32",
    "n_cols": "i32",
    "cols_per_split": "i32",
    "rows_padded": "i32",
    "n_splits": "i32",
    "FROM_PARTIALS": "constexpr",
    "WRITE_GRAD": "constexpr",
    "BLOCK_M": "constexpr",
    "BLOCK_V": "constexpr",
}
TD_ROW = {
    "values_ptr": "*fp32",
    "stride_v": "i32",
    "rewards_ptr": "*fp32",
    "mask_ptr": "*u8",
    "stride_m": "i32",
    "norm_ptr": "*fp32",
    "w_ptr": "*fp32",
    "stride_w": "i32",
    "stats_ptr": "*fp32",
    "seq_len": "i32",
    "gamma": "fp32",
    "gamma_lam": "fp32",
    "beta": "fp32",
    "w_min": "fp32",
    "w_max": "fp32",
    "USE_GAE": "constexpr",
    "NORMALIZE": "constexpr",
    "BLOCK": "constexpr",
}


def variants() -> dict[str, tuple[str, dict[str, str], dict[str, object]]]:
    """name -> (kernel, signature, constexprs) for every launch the wrappers make, per architecture."""
    out = {}
    for arch in ARCHS:
        for logits in ("fp32", "bf16"):
            out[f"partial_lse-{logits}-sm_{arch}"] = ("partial_lse", {"logits": logits}, {})
        for logits, grad in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
            for mode, from_partials, write_grad in (
                ("stats+grad", True, True),
                ("stats", True, False),
                ("grad", False, True),
            ):
                out[f"finish-{mode}-{logits}-{grad}-sm_{arch}"] = (
                    "finish",
                    {"logits": logits, "grad": grad},
                    {"FROM_PARTIALS": from_partials, "WRITE_GRAD": write_grad},
                )
        for use_gae in (False, True):
            for normalize in (False, True):
                out[f"td_row-{'gae' if use_gae else 'lam0'}-{'norm' if normalize else 'raw'}-sm_{arch}"] = (
                    "td_row",
                    {},
                    {"USE_GAE": use_gae, "NORMALIZE": normalize},
                )
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import wmtp.kernels.fused_mtp_ce_triton as ce
    import wmtp.kernels.td_weights as td

    tile = {"BLOCK_M": ce.MIN_BLOCK_M, "BLOCK_V": ce.GPU_TILE_ELEMENTS // ce.MIN_BLOCK_M}
    kernels = {
        "partial_lse": (ce._partial_lse_kernel, PARTIAL_LSE, tile, ce.GPU_NUM_WARPS),
        "finish": (ce._finish_kernel, FINISH, tile, ce.GPU_NUM_WARPS),
        "td_row": (td._row_kernel(), TD_ROW, {"BLOCK": td.GPU_MAX_BLOCK}, td.GPU_NUM_WARPS),
    }
    results = {}
    for name, (kind, dtypes, constexprs) in variants().items():
        kernel, signature, sizes, num_warps = kernels[kind]
        arch = int(name.rsplit("sm_", 1)[1])
        try:
            source = ASTSource(
                fn=kernel,
                signature={k: v.format(**dtypes) for k, v in signature.items()},
                constexprs={**sizes, **constexprs},
            )
            compiled = triton.compile(
                source, target=GPUTarget("cuda", arch, WARP_SIZE), options={"num_warps": num_warps}
            )
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin produced"
        except Exception:  # noqa: BLE001 - reported per variant, the test shows it
            results[name] = traceback.format_exc(limit=3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
