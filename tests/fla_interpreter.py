"""fla's RWKV-7 Triton kernels on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).

CI has no GPU, so this is how `model/wkv.py`'s `wkv_fla` (the kernel every CUDA user trains
with) is tested: tests/test_wkv_fla.py runs this file in a child process, which prints one JSON
object of measured differences against `wkv_ref` / the chunked model, and asserts on them.

    python tests/fla_interpreter.py      # (PYTHONPATH=src) the JSON the tests read

A child process because the interpreter must be switched on before anything imports
triton.language (torch's dynamo imports it as soon as triton is installed, so in the pytest
process it is long imported), and because the patches below change triton globally: they
stay out of the other tests' process.

The interpreter runs each kernel program as numpy code; four of its gaps stop fla 0.6.0
(triton 3.8 / 3.9) from running or from computing bf16 right, and `load()` covers each with
the smallest patch, one function each, saying what upstream behaviour it stands in for.
Nothing here patches fla's own code or is used outside the tests.
"""

from __future__ import annotations

import ast
import json
import os
import sys

# The pair scripts/bootstrap.sh --dev installs on a CPU torch (see there for the CUDA pairs)
PINNED = "fla-core 0.6.0 + triton 3.9.0"


class Unavailable(Exception):
    """fla / triton cannot be imported: the tests skip with this reason."""


def measure(script: str | os.PathLike) -> dict:
    """Run `script` (this file, or a test file whose `__main__` measures under the
    interpreter) in a child process with src/ on PYTHONPATH; the last line it prints, as
    JSON. Skips the calling test with the child's reason when fla / triton are missing."""
    import subprocess
    from pathlib import Path

    import pytest

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    return got


def load():
    """fla's `chunk_rwkv7`, imported with its kernels interpreted on the CPU."""
    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton.language is already imported with compiled kernels: call "
                           "load() before importing torch._dynamo / rwkvforge.model")
    # before triton.language and fla are imported: triton.jit then makes InterpretedFunctions
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime import autotuner, interpreter
    except ImportError as e:
        raise Unavailable(f"triton is not installed ({e}); "
                          f"scripts/bootstrap.sh --dev installs {PINNED}") from e
    _keep_first_autotune_config(autotuner)
    _loop_variables_as_tensors(interpreter)
    _bf16_as_rounded_fp32(interpreter, tl)
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        raise Unavailable(f"fla is not importable ({e}); "
                          f"scripts/bootstrap.sh --dev installs {PINNED}") from e
    _rebind_gather(tl)
    return chunk_rwkv7


def _keep_first_autotune_config(autotuner):
    """Autotune: with several configs triton benchmarks each one through the active GPU driver,
    and the interpreter has none ("0 active drivers"). Report the same time for every config
    without running it: triton then keeps the first one that survives fla's own pruning (what
    it does by itself when one is left; triton 3.7 benchmarks even then)."""
    if getattr(autotuner.Autotuner._bench, "_rwkvforge", False):
        return

    def no_benchmark(self, *args, config, **meta):
        return [0.0, 0.0, 0.0]  # (median, 20th, 80th percentile), as _bench returns them

    no_benchmark._rwkvforge = True
    autotuner.Autotuner._bench = no_benchmark


def _loop_variables_as_tensors(interpreter):
    """`for i in range(n)` inside a kernel: compiled triton makes `i` an int32 tensor (an scf.for
    induction variable), so fla writes `i_t.to(tl.int64)`; the interpreter runs the loop as
    Python and `i` stays an int ("'int' object has no attribute 'to'"). Rewrite each kernel's
    `range` / `tl.range` loops (not `tl.static_range`, which is an int loop in triton too) to
    yield interpreter scalars, through the interpreter's own AST rewrite of kernel source."""
    T = interpreter.ASTTransformer
    if hasattr(T, "visit_For"):
        return

    def loop_tensors(it):
        for i in it:
            yield interpreter._implicit_cvt(i)  # an int32 scalar tensor, like program_id

    def visit_For(self, node):
        node = self.generic_visit(node)
        f = node.iter.func if isinstance(node.iter, ast.Call) else None
        name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
        if name == "range":
            node.iter = ast.Call(func=ast.Name(id="_rwkvforge_loop_tensors", ctx=ast.Load()),
                                 args=[node.iter], keywords=[])
        return node

    # the rewritten kernel runs in its module's globals, which the interpreter fills with its
    # own module's names: the helper reaches every kernel from there
    interpreter._rwkvforge_loop_tensors = loop_tensors
    T.visit_For = visit_For


def _bf16_as_rounded_fp32(interpreter, tl):
    """bf16: the interpreter keeps bf16 values as their raw uint16 bits and then runs `tl.dot`
    and element-wise arithmetic on those integers as if they were numbers, and converts
    fp32 -> bf16 by truncating the mantissa (with a carry bug) instead of rounding to nearest
    even as the GPU does. Emulate bf16 instead: inside a kernel a bf16 value is an fp32 numpy
    array holding a bf16-representable number (every cast to bf16 and every bf16 arithmetic
    result rounds to nearest even); memory stays bf16 (loads widen the 16-bit words exactly,
    stores round)."""
    import numpy as np

    B = interpreter.InterpreterBuilder
    if getattr(B, "_rwkvforge_bf16", False):
        return
    bf16 = tl.bfloat16
    np_dtype, validate = interpreter._get_np_dtype, interpreter._validate_np_data_size

    def rne(x):  # fp32 array -> fp32 array of the nearest bf16 values (ties to even; NaN kept)
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        up = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out = np.where(np.isnan(x), bits, up & np.uint32(0xFFFF0000))
        return out.astype(np.uint32).view(np.float32)

    def to_bits(x):
        return (rne(x).view(np.uint32) >> np.uint32(16)).astype(np.uint16)

    def from_bits(u):
        return (u.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def get_np_dtype(t):
        return np.dtype(np.float32) if t == bf16 else np_dtype(t)

    def validate_np_data_size(data, t):  # (a bf16 handle holds 32-bit numbers now)
        return t == bf16 or validate(data, t)

    load, store = B.create_masked_load, B.create_masked_store
    cast, binary, fp_to_fp = B.cast_impl, B.binary_op, B.create_fp_to_fp

    # (*hints: the cache / eviction / volatile arguments, which differ across triton versions)
    def create_masked_load(self, ptrs, mask, other, *hints):
        if ptrs.get_element_ty() != bf16:
            return load(self, ptrs, mask, other, *hints)
        other_bits = (np.zeros_like(ptrs.data, dtype=np.uint16) if other is None
                      else np.broadcast_to(to_bits(other.data), ptrs.data.shape).copy())
        bits = interpreter._interpreter.load(ptrs.data, mask.data, other_bits, np.dtype(np.uint16))
        return interpreter.TensorHandle(from_bits(bits), bf16)

    def create_masked_store(self, ptrs, value, mask, *hints):
        if ptrs.get_element_ty() == bf16 and value.data.dtype == np.float32:
            value = interpreter.TensorHandle(to_bits(value.data), tl.uint16)
        return store(self, ptrs, value, mask, *hints)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == bf16:
            return interpreter.TensorHandle(rne(src.data.astype(np.float32)), bf16)
        if src.dtype.scalar == bf16:  # already fp32 numbers: widen / convert from those
            src = interpreter.TensorHandle(src.data, tl.float32)
        return cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):  # explicit `.to(..., fp_downcast_rounding)`
        if bf16 in (src.dtype.scalar, dst_type.scalar):
            return cast_impl(self, src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def binary_op(self, lhs, rhs, op):
        out = binary(self, lhs, rhs, op)
        if out.dtype.scalar == bf16:
            out = interpreter.TensorHandle(rne(out.data.astype(np.float32)), bf16)
        return out

    interpreter._get_np_dtype = get_np_dtype
    interpreter._validate_np_data_size = validate_np_data_size
    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.cast_impl, B.binary_op, B.create_fp_to_fp = cast_impl, binary_op, create_fp_to_fp
    if not hasattr(B, "get_bf16"):  # triton 3.7's interpreter has no bf16 constants at all
        B.get_bf16 = lambda self, value: cast_impl(self, self.get_fp32(value), bf16)
    # the casts bound as lambdas at class creation call self.cast_impl: they now round too
    B._rwkvforge_bf16 = True


def _rebind_gather(tl):
    """`tl.gather`: fla binds it at import (`gather = tl.gather` in fla.ops.utils.op, imported
    by name into its kernels' modules). The interpreter swaps triton.language's builtins for
    its own only while a kernel runs, so the bound builtin is the compiled-mode one and fails
    ("_semantic argument must be provided"). Rebind every such name to a @triton.jit wrapper
    that looks `tl.gather` up when called."""
    import triton

    globals()["tl"] = tl  # the interpreter finds `tl` in the wrapper's module globals

    @triton.jit
    def gather(src, index, axis: tl.constexpr):
        return tl.gather(src, index, axis)

    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and getattr(module, "gather", None) is tl.gather:
            module.gather = gather


# ---------------------------------------------------------------------------------- the checks
def _inputs(B, T, H, N, seed):
    """Random inputs shaped like RWKV-7's (as tests/test_wkv.py's `_inputs`): a = -kk,
    b = kk * iclr with unit-norm kk, log_w in [LOG_W_MIN, 0)."""
    import torch
    import torch.nn.functional as F

    from rwkvforge.model.wkv import LOG_W_MIN

    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g)
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g)
    log_w = LOG_W_MIN * torch.sigmoid(torch.randn(B, T, H, N, generator=g) * 3.0)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    s0 = torch.randn(B, H, N, N, generator=g) * 0.5
    return [r, log_w, k, v, -kk, kk * iclr, s0]


NAMES = ["y", "state", "dr", "dlog_w", "dk", "dv", "da", "db", "dstate0"]


def _fwd_bwd(fn, xs, seed=1):
    """y, final state and the gradients of every input (initial state included) under a
    fixed random cotangent on y and on the final state; all fp32."""
    import torch

    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    y, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    gy, gs = (torch.randn(t.shape, generator=g).to(t.device) for t in (y, s))
    ((y * gy).sum() + (s * gs).sum()).backward()
    return [y.detach(), s.detach()] + [x.grad.float() for x in xs]


def _diff(got, want) -> dict:
    """Per quantity: max abs difference, relative difference of the norms, max abs of want;
    plus the dtypes wkv_fla returned."""
    return {n: {"max_abs": float((a.float() - b).abs().max()),
                "rel": float((a.float() - b).norm() / b.norm()),
                "ref_max": float(b.abs().max()), "dtype": str(a.dtype)}
            for n, a, b in zip(NAMES, got, want)}


def main() -> int:
    try:
        fn = load()
    except Unavailable as e:
        print(json.dumps({"skip": str(e)}))
        return 0
    import inspect
    import tempfile
    from pathlib import Path

    import torch

    from rwkvforge.model import wkv as W

    calls = []

    def spy(**kw):  # records what wkv_fla passes to fla
        calls.append({k: v for k, v in kw.items() if isinstance(v, (int, float, bool))})
        return fn(**kw)

    spy.__signature__ = inspect.signature(fn)
    W._fla_fn = spy
    out = {"versions": {}}
    import fla
    import triton

    out["versions"] = {"fla": fla.__version__, "triton": triton.__version__}

    # fp32, T=50 (a partial last chunk for fla's 64- and 16-step forms), with and without
    # lower_bound; the reference sees the same inputs
    xs = _inputs(1, 50, 2, 64, seed=0)
    want = _fwd_bwd(W.wkv_ref, xs)
    for bound in (True, False):
        calls.clear()
        got = _fwd_bwd(lambda *a, b=bound: W.wkv_fla(*a, bound=b), xs)
        out[f"fp32_bound={bound}"] = {"diff": _diff(got, want), "calls": list(calls)}
    out["log_w_min_fp32"] = float(xs[1].min())

    # bf16 inputs; the reference runs the same bf16 numbers in fp32
    xs = [x.bfloat16() if i < 6 else x for i, x in enumerate(_inputs(1, 64, 2, 64, seed=2))]
    calls.clear()
    got = _fwd_bwd(W.wkv_fla, xs)
    want = _fwd_bwd(W.wkv_ref, [x.float() for x in xs])
    out["bf16"] = {"diff": _diff(got, want), "calls": list(calls)}
    out["log_w_min_bf16"] = float(xs[1].min())

    # bytes fla keeps for backward per token and channel (bf16 inputs as training passes
    # them): the slope between T=128 and T=256, so the per-sequence state drops out
    saved = {}
    for T in (128, 256):
        xs = [x.bfloat16() if i < 6 else x for i, x in enumerate(_inputs(1, T, 2, 64, seed=3))]
        xs = [x.requires_grad_(True) for x in xs]
        seen = {}

        def pack(t, seen=seen):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            W.wkv_fla(*xs)
        saved[T] = sum(seen.values())
    out["saved_bytes_per_token_channel"] = (saved[256] - saved[128]) / (128 * 2 * 64)

    # a tiny whole model (2 layers, C=128, head 64): loss and logits, fla vs chunked
    from rwkvforge.checkpoint import load_model, save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.loss import chunked_head_loss

    with tempfile.TemporaryDirectory() as tmp:
        path = save_pth(make_random_model_sd(2, 128, seed=0), Path(tmp) / "tiny.pth")
        model = load_model(path)
    idx = torch.randint(0, 65536, (1, 40), generator=torch.Generator().manual_seed(0))
    targets, weights = torch.roll(idx, -1, 1), torch.ones(1, 40)
    res = {}
    calls.clear()
    with torch.no_grad():
        for impl in ("chunked", "fla"):
            model.wkv_impl = impl
            h, state = model.forward_hidden(idx)
            loss = chunked_head_loss(h, model.head, targets, weights) / weights.sum()
            res[impl] = (model.head(h), float(loss), torch.stack([s for _, s, _ in state]))
    out["model"] = {"fla_calls": len(calls), "loss_fla": res["fla"][1],
                    "loss_chunked": res["chunked"][1],
                    "logits_max_abs": float((res["fla"][0] - res["chunked"][0]).abs().max()),
                    "state_max_abs": float((res["fla"][2] - res["chunked"][2]).abs().max())}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
