"""The native ONNX Runtime kernels (exporters/native/) against the PyTorch references of the zoo.

Single-node models (opset 18 + ai.edgecompress 1) run in onnxruntime with the library registered. Only
rows with at least one allowed key are compared (the references leave the others unspecified); the
kernels must give exactly 0 there.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.models.attention import AttentionConfig, BlockSparseAttention, banded_attention
from exporters import native

TOL = 1e-5
OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("ai.edgecompress", 1)]


@pytest.fixture(scope="module")
def options() -> ort.SessionOptions:
    from exporters.native.build import build

    build(native.host_arch())  # a no-op when the sources did not change since the last build
    so = ort.SessionOptions()
    so.log_severity_level = 3
    assert native.register(so)
    return so


def _model(
    op: str, inputs: list[str], feeds: dict[str, np.ndarray], init: list[Any] | None = None, **attrs: Any
) -> bytes:
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(bool): TensorProto.BOOL}
    values = [
        helper.make_tensor_value_info(n, types[feeds[n].dtype], list(feeds[n].shape)) for n in inputs if n in feeds
    ]
    node = helper.make_node(op, inputs, ["Y"], domain="ai.edgecompress", **attrs)
    graph = helper.make_graph(
        [node], op, values, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=init or []
    )
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def _run(options: ort.SessionOptions, model: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _check(y: np.ndarray, ref: np.ndarray, has_key: np.ndarray) -> None:
    """has_key: (B, S) rows with at least one allowed key."""
    rows = np.broadcast_to(has_key[:, None, :, None], y.shape)
    assert np.abs(y - ref)[rows].max(initial=0.0) <= TOL
    assert np.all(y[~rows] == 0.0)


def _qkv(b: int, h: int, s: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=gen) for _ in range(3))


def _windowed_case(
    options: ort.SessionOptions, s: int, *, window: int, causal: bool, pad: bool, glob: bool, d: int = 16
) -> None:
    b, h = 2, 2
    q, k, v = _qkv(b, h, s, d, seed=s * 7 + window)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    if pad:
        key_mask[1, s - max(1, s // 3) :] = False
    global_mask = torch.zeros(b, s, dtype=torch.bool)
    if glob:
        global_mask[:, 0] = True
        global_mask[0, s // 2] = True
        global_mask[1, s - 1] = True  # padding when pad: then not global
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()}
    inputs = ["Q", "K", "V", "key_padding_mask" if pad else "", "global_mask" if glob else ""]
    while not inputs[-1]:
        inputs.pop()
    feeds |= {"key_padding_mask": key_mask.numpy(), "global_mask": global_mask.numpy()}
    y = _run(options, _model("WindowedAttention", inputs, feeds, window=window, causal=int(causal)), feeds)

    effective = global_mask & key_mask if glob else None
    ref = banded_attention(q, k, v, key_mask, window=window, causal=causal, global_mask=effective).numpy()
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = ((i - j).abs() <= window)[None].expand(b, s, s)
    if effective is not None:
        allowed = allowed | effective[:, None, :] | effective[:, :, None]
    allowed = allowed & key_mask[:, None, :]
    if causal:
        allowed = allowed & (j <= i)[None]
    _check(y, ref, allowed.any(-1).numpy())


@pytest.mark.parametrize("s", [3, 8, 16, 24, 37])  # below, equal to, multiples of and above the window (8)
@pytest.mark.parametrize("causal", [False, True])
def test_windowed_matches_reference(options: ort.SessionOptions, s: int, causal: bool) -> None:
    for pad in (False, True):
        for glob in (False, True):
            _windowed_case(options, s, window=8, causal=causal, pad=pad, glob=glob)


@pytest.mark.parametrize(
    ("s", "window", "d"),
    [(300, 40, 16), (130, 1, 8), (50, 200, 48), (97, 33, 64), (64, 64, 20)],  # long, narrow, wider than S, odd D
)
def test_windowed_other_shapes(options: ort.SessionOptions, s: int, window: int, d: int) -> None:
    for causal in (False, True):
        _windowed_case(options, s, window=window, causal=causal, pad=True, glob=True, d=d)


def test_windowed_many_globals_and_empty_rows(options: ort.SessionOptions) -> None:
    b, h, s, d = 2, 1, 90, 8
    q, k, v = _qkv(b, h, s, d, seed=3)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    key_mask[1] = False  # no real key at all: every row of batch 1 is 0
    key_mask[0, 10:20] = False
    global_mask = torch.rand(b, s, generator=torch.Generator().manual_seed(1)) < 0.5  # about 45 globals
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "kpm": key_mask.numpy(), "gm": global_mask.numpy()}
    y = _run(options, _model("WindowedAttention", ["Q", "K", "V", "kpm", "gm"], feeds, window=4), feeds)
    effective = global_mask & key_mask
    ref = banded_attention(q, k, v, key_mask, window=4, causal=False, global_mask=effective).numpy()
    has_key = np.zeros((b, s), bool)
    has_key[0] = True  # every row of batch 0 sees a global key
    _check(y, ref, has_key)
    assert np.all(y[1] == 0.0)


def test_windowed_large_scores_stay_finite(options: ort.SessionOptions) -> None:
    q, k, v = _qkv(1, 2, 40, 16, seed=5)
    q = q * 60.0  # scores in the hundreds: exp overflows without the running max
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()}
    y = _run(options, _model("WindowedAttention", ["Q", "K", "V"], feeds, window=6), feeds)
    ref = banded_attention(q, k, v, torch.ones(1, 40, dtype=torch.bool), window=6, causal=False, global_mask=None)
    assert np.isfinite(y).all()
    assert np.abs(y - ref.numpy()).max() <= 1e-4


def _layouts(att: BlockSparseAttention, most: int, dtype: type) -> np.ndarray:
    lay = np.zeros((most, most, most), dtype=dtype)
    for t in range(most):
        lay[t, : t + 1, : t + 1] = att.layout(t + 1).numpy()
    return lay


@pytest.mark.parametrize(
    ("block", "local", "random", "global_tokens"),
    [(4, 1, 0, 0), (4, 1, 1, 4), (8, 0, 2, 8), (2, 1, 2, 3), (40, 1, 0, 0)],  # 40 > the kernel's 32-row blocks
)
def test_block_sparse_matches_reference(
    options: ort.SessionOptions, block: int, local: int, random: int, global_tokens: int
) -> None:
    cfg = AttentionConfig(
        kind="block_sparse", block=block, local_blocks=local, random_blocks=random, global_tokens=global_tokens, seed=3
    )
    att = BlockSparseAttention(cfg)
    for nb, dtype, pad in ((1, bool, False), (2, np.uint8, True), (5, bool, True), (9, np.uint8, False)):
        s, b, h, d = nb * block, 2, 2, 8
        q, k, v = _qkv(b, h, s, d, seed=nb)
        key_mask = torch.ones(b, s, dtype=torch.bool)
        if pad:
            key_mask[1, s - max(1, s // 3) :] = False
        feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy(), "kpm": key_mask.numpy()}
        init = [numpy_helper.from_array(_layouts(att, 10, dtype), "layout")]
        model = _model("BlockSparseAttention", ["Q", "K", "V", "kpm", "layout"], feeds, init, block_size=block)
        y = _run(options, model, feeds)
        ref = att(q, k, v, key_mask).numpy()
        lay = att.layout(nb).repeat_interleave(block, 0).repeat_interleave(block, 1)
        _check(y, ref, (lay[None] & key_mask[:, None, :]).any(-1).numpy())


def test_block_sparse_without_padding_mask(options: ort.SessionOptions) -> None:
    att = BlockSparseAttention(AttentionConfig(kind="block_sparse", block=4, random_blocks=1, seed=1))
    q, k, v = _qkv(1, 2, 24, 8, seed=2)
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()}
    init = [numpy_helper.from_array(_layouts(att, 6, bool), "layout")]
    y = _run(options, _model("BlockSparseAttention", ["Q", "K", "V", "", "layout"], feeds, init, block_size=4), feeds)
    assert np.abs(y - att(q, k, v, torch.ones(1, 24, dtype=torch.bool)).numpy()).max() <= TOL


def _feeds(s: int, b: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((b, 2, s, 8), dtype=np.float32) for n in "QKV"}


def test_bad_window_is_an_ort_error(options: ort.SessionOptions) -> None:
    feeds = _feeds(10)
    for window in (0, -3):
        with pytest.raises(Exception, match=r"WindowedAttention: attribute 'window' .* must be > 0"):
            _run(options, _model("WindowedAttention", ["Q", "K", "V"], feeds, window=window), feeds)
    with pytest.raises(Exception, match="attribute 'window' is required"):
        _run(options, _model("WindowedAttention", ["Q", "K", "V"], feeds), feeds)


def test_bad_shapes_are_ort_errors(options: ort.SessionOptions) -> None:
    feeds = _feeds(10, b=2) | {"kpm": np.ones((2, 9), bool)}
    # the model declares no shapes, so ORT's own shape inference lets the mismatch through to the kernel
    model = _model("WindowedAttention", ["Q", "K", "V", "kpm"], {**feeds, "kpm": np.ones((2, 9), bool)}, window=2)
    unshaped = _strip_shapes(model)
    with pytest.raises(Exception, match=r"key_padding_mask must have shape \(B, S\) = \(2, 10\) .* got \(2, 9\)"):
        _run(options, unshaped, feeds)
    flat = {n: a[0] for n, a in _feeds(10).items()}  # (H, S, D): rank 3
    with pytest.raises(Exception, match=r"Q must be 4-D \(B, H, S, D\)"):
        _run(options, _strip_shapes(_model("WindowedAttention", ["Q", "K", "V"], flat, window=2)), flat)


def test_block_sparse_errors(options: ort.SessionOptions) -> None:
    layout = [numpy_helper.from_array(np.ones((3, 3, 3), bool), "layout")]
    feeds = _feeds(10)
    with pytest.raises(Exception, match=r"S = 10 is not a multiple of block_size = 4"):
        _run(options, _model("BlockSparseAttention", ["Q", "K", "V", "", "layout"], feeds, layout, block_size=4), feeds)
    feeds = _feeds(16)
    with pytest.raises(Exception, match=r"nb = S / block_size = 4 blocks, but layout \(3, 3, 3\)"):
        _run(options, _model("BlockSparseAttention", ["Q", "K", "V", "", "layout"], feeds, layout, block_size=4), feeds)
    with pytest.raises(Exception, match="'block_size' must be > 0"):
        _run(options, _model("BlockSparseAttention", ["Q", "K", "V", "", "layout"], feeds, layout, block_size=0), feeds)
    floats = [numpy_helper.from_array(np.ones((4, 4, 4), np.float32), "layout")]
    with pytest.raises(Exception, match="layout must be bool or uint8"):
        _run(options, _model("BlockSparseAttention", ["Q", "K", "V", "", "layout"], feeds, floats, block_size=4), feeds)


def _strip_shapes(model: bytes) -> bytes:
    import onnx

    proto = onnx.load_from_string(model)
    for value in proto.graph.input:
        value.type.tensor_type.ClearField("shape")
    return proto.SerializeToString()


def test_build_record_matches_the_library(options: ort.SessionOptions) -> None:
    record = native.check_compatible()
    lib = ctypes.CDLL(str(native.library_path()))
    lib.EdgeCompressOpsIsa.restype = ctypes.c_char_p
    assert record["arch"] == native.host_arch()
    assert record["ort_api_version"] == lib.EdgeCompressOpsApiVersion()
    assert lib.EdgeCompressOpsIsa().decode() in record["kernels"]


def test_older_runtime_is_a_clear_error(options: ort.SessionOptions) -> None:
    built = native.check_compatible()["ort_api_version"]
    with pytest.raises(
        native.IncompatibleLibrary, match=rf"built for ONNX Runtime API {built}; .* offers up to 20; rebuild"
    ):
        native.check_compatible(runtime_version="1.20.1")


def test_register_without_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_LIB_ROOT", tmp_path)
    assert not native.available()
    assert native.register(ort.SessionOptions()) is False
    lib = native.library_path()
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a library")
    with pytest.raises(native.IncompatibleLibrary, match="build record"):
        native.register(ort.SessionOptions())
    native.metadata_path().write_text(json.dumps({"arch": native.host_arch(), "ort_api_version": 1}))
    with pytest.raises(native.IncompatibleLibrary, match="ONNX Runtime refused"):
        native.register(ort.SessionOptions())


def test_aarch64_matches_x86() -> None:
    from exporters.native.check_aarch64 import compare, default_root, emulation_ready

    root = default_root()  # prepared by `make setup` when it runs as root
    reason = emulation_ready(root)
    if reason:
        pytest.skip(reason)
    result = compare(root, "neoverse-n1")
    assert result["kernels"] == "neon"
    assert max(result["max_abs_diff"].values()) <= TOL


_EVERY_SET = """
import sys
import numpy as np, onnxruntime as ort, ctypes
from onnx import TensorProto, helper
from exporters import native

so = ort.SessionOptions()
native.register(so)
lib = ctypes.CDLL(str(native.library_path()))
lib.EdgeCompressOpsIsa.restype = ctypes.c_char_p
opsets = [helper.make_opsetid("", 18), helper.make_opsetid("ai.edgecompress", 1)]
out = {"isa": np.array(lib.EdgeCompressOpsIsa().decode())}
rng = np.random.default_rng(0)
for s, window, causal, d in [(37, 8, 0, 16), (300, 40, 0, 64), (300, 40, 1, 64), (1000, 256, 0, 64)]:
    q, k, v = (rng.standard_normal((2, 2, s, d)).astype(np.float32) for _ in range(3))
    pad = np.ones((2, s), bool)
    pad[1, s - s // 3 :] = False
    glob = np.zeros((2, s), bool)
    glob[:, 0] = glob[0, s // 2] = True
    feeds = {"Q": q, "K": k, "V": v, "m": pad, "g": glob}
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(q.shape)) for n in "QKV"]
    info += [helper.make_tensor_value_info(n, TensorProto.BOOL, [2, s]) for n in "mg"]
    node = helper.make_node("WindowedAttention", ["Q", "K", "V", "m", "g"], ["Y"], domain="ai.edgecompress",
                            window=window, causal=causal)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "w", info, [y]), opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out[f"w{s}_{window}_{causal}"] = sess.run(None, feeds)[0]
np.savez(sys.argv[1], **out)
"""


def _kernel_set_outputs(tmp_path: Path, name: str) -> tuple[int, dict[str, np.ndarray] | str]:
    import os
    import subprocess
    import sys

    target = tmp_path / f"{name or 'default'}.npz"
    env = {**os.environ, "EDGE_COMPRESS_KERNELS": name}
    proc = subprocess.run(
        [sys.executable, "-c", _EVERY_SET, str(target)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return proc.returncode, proc.stderr.strip().splitlines()[-1]
    with np.load(target) as data:
        return 0, {key: data[key] for key in data.files}


@pytest.mark.skipif(native.host_arch() != "x86_64", reason="x86-64 has more than one kernel set")
def test_every_x86_kernel_set_agrees(options: ort.SessionOptions, tmp_path: Path) -> None:
    """The sse2, avx2 and (where the CPU has it) avx512 kernels give the outputs of the default choice,
    with padding, global tokens, causal bands and tiles cut at the band edges; a set the CPU cannot run,
    or an unknown name, is refused by name when the library registers."""
    code, best = _kernel_set_outputs(tmp_path, "")
    assert code == 0 and isinstance(best, dict), best
    flags = Path("/proc/cpuinfo").read_text()
    runnable = ["sse2"] + (["avx2"] if " avx2" in flags and " fma" in flags else [])
    runnable += ["avx512"] if " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags else []
    for name in runnable:
        code, got = _kernel_set_outputs(tmp_path, name)
        assert code == 0 and isinstance(got, dict), got
        assert str(got["isa"]) == name
        for key, value in best.items():
            if key != "isa":
                assert np.abs(got[key] - value).max() <= TOL, (name, key)
    refused = ["bogus"] + (["avx512"] if "avx512" not in runnable else [])
    for name in refused:
        code, message = _kernel_set_outputs(tmp_path, name)
        assert code != 0 and f"EDGE_COMPRESS_KERNELS={name}:" in str(message), message
