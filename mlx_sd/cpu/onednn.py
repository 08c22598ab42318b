"""oneDNN's direct bf16 convolution, through its C API (ctypes on the runtime blas.py loads).

The shifted-GEMM convolution (gemm.py) runs a 3x3 convolution as nine GEMMs of C terms whose
fp32 sums every tap reads and writes again. oneDNN's own convolution (`brgconv`, on the
`vdpbf16ps` instructions) keeps the sums in registers over all nine taps, as torch's bf16
convolutions on the CPU do: on a Zen 4, 0.70-1.02x the shifted GEMMs' time at the VAE's layers,
0.38x at its last (3 outputs), 0.82-0.89x at the UNet's 32² and 64² ones (benchmarks/cpu_gemm.py).
So the AVX-512 BF16 class, which already takes oneDNN's bf16 GEMM, takes its convolutions too
(gemm.conv2d); a probe at first use (blas.py) refuses them where they do not run right.

Weights arrive as (out, k, k, in) bf16 and are reordered on each call into the blocked layout
the kernel wants (a few ms; kept nowhere, so no second copy of the weights is held); the input
arrives rounded to bf16. The result, bias included, is written in fp32 straight into the
output, a residual added in the same pass (a binary post-op). Primitive descriptors are created
per call: oneDNN's primitive cache makes a repeated shape cost ~20 µs.
"""

from __future__ import annotations

import ctypes
from contextlib import ExitStack

import numpy as np

# oneDNN 3.x C API constants (dnnl_types.h, dnnl_common_types.h).
_CPU, _IN_ORDER = 1, 1
_BF16, _F32, _ANY = 2, 3, 1
_FORWARD_INFERENCE, _DIRECT, _BINARY_ADD = 0x60, 0x1, 0x1FFF0
_QUERY_IMPL_INFO, _QUERY_WEIGHTS_MD = 8, 131
_SRC, _DST, _WEIGHTS, _BIAS, _FROM, _TO = 1, 17, 33, 41, 1, 17
_POST_OP_SRC1 = 32768 + 2  # DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_DIMS = ctypes.POINTER(ctypes.c_int64)


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


_SIGNATURES: dict[str, list] = {
    "dnnl_engine_create": [_PP, ctypes.c_int, ctypes.c_size_t],
    "dnnl_stream_create": [_PP, _P, ctypes.c_uint],
    "dnnl_memory_desc_create_with_strides": [_PP, ctypes.c_int, _DIMS, ctypes.c_int, _DIMS],
    "dnnl_memory_desc_create_with_tag": [_PP, ctypes.c_int, _DIMS, ctypes.c_int, ctypes.c_int],
    "dnnl_memory_desc_destroy": [_P],
    "dnnl_post_ops_create": [_PP],
    "dnnl_post_ops_append_binary": [_P, ctypes.c_int, _P],
    "dnnl_post_ops_destroy": [_P],
    "dnnl_primitive_attr_create": [_PP],
    "dnnl_primitive_attr_set_post_ops": [_P, _P],
    "dnnl_primitive_attr_destroy": [_P],
    "dnnl_convolution_forward_primitive_desc_create": [_PP, _P, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _DIMS,
                                                       _DIMS, _DIMS, _DIMS, _P],
    "dnnl_reorder_primitive_desc_create": [_PP, _P, _P, _P, _P, _P],
    "dnnl_primitive_desc_query": [_P, ctypes.c_int, ctypes.c_int, _P],
    "dnnl_primitive_desc_destroy": [_P],
    "dnnl_primitive_create": [_PP, _P],
    "dnnl_primitive_destroy": [_P],
    "dnnl_memory_create": [_PP, _P, _P, _P],
    "dnnl_memory_destroy": [_P],
    "dnnl_primitive_execute": [_P, _P, ctypes.c_int, ctypes.POINTER(_Arg)],
    "dnnl_stream_wait": [_P],
    "dnnl_stream_destroy": [_P],
}


class ConvolutionError(RuntimeError):
    """oneDNN refused or failed a convolution (a status other than success)."""


def _dims(*values: int) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


class Convolutions:
    """oneDNN's bf16 convolutions on a CPU engine of a loaded libdnnl; any thread may call them."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        library.dnnl_primitive_desc_query_md.argtypes = [_P, ctypes.c_int, ctypes.c_int]
        library.dnnl_primitive_desc_query_md.restype = _P
        library.dnnl_memory_desc_get_size.argtypes = [_P]
        library.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self._engine = _P()
        self._call("dnnl_engine_create", ctypes.byref(self._engine), _CPU, 0)

    def _call(self, name: str, *args: object) -> None:
        status = getattr(self._lib, name)(*args)
        if status != 0:
            raise ConvolutionError(f"oneDNN {name} failed with status {status}")

    def _make(self, stack: ExitStack, create: str, destroy: str, *args: object) -> _P:
        """A oneDNN object from `create`, destroyed with `destroy` when `stack` closes."""
        handle = _P()
        self._call(create, ctypes.byref(handle), *args)
        stack.callback(getattr(self._lib, destroy), handle)
        return handle

    def _nhwc(self, stack: ExitStack, shape: tuple[int, int, int, int], dtype: int) -> _P:
        """A memory descriptor of a dense NHWC (or, for weights, OHWI) array, in oneDNN's NCHW order."""
        n, h, w, c = shape
        return self._make(stack, "dnnl_memory_desc_create_with_strides", "dnnl_memory_desc_destroy", 4,
                          _dims(n, c, h, w), dtype, _dims(h * w * c, 1, w * c, c))

    def _vector(self, stack: ExitStack, length: int) -> _P:
        """A memory descriptor of an fp32 vector (a bias)."""
        return self._make(stack, "dnnl_memory_desc_create_with_strides", "dnnl_memory_desc_destroy", 1,
                          _dims(length), _F32, _dims(1))

    def _memory(self, stack: ExitStack, descriptor: _P, data: int) -> _P:
        return self._make(stack, "dnnl_memory_create", "dnnl_memory_destroy", descriptor, self._engine, _P(data))

    def _run(self, stream: _P, primitive: _P, args: list[tuple[int, _P]]) -> None:
        self._call("dnnl_primitive_execute", primitive, stream, len(args), (_Arg * len(args))(*args))
        self._call("dnnl_stream_wait", stream)

    def _implementation(self, primitive_desc: _P) -> str:
        """The name of the implementation oneDNN picked (e.g. brgconv:avx512_core_bf16)."""
        name = ctypes.c_char_p()
        self._call("dnnl_primitive_desc_query", primitive_desc, _QUERY_IMPL_INFO, 0, ctypes.byref(name))
        return (name.value or b"").decode()

    def _descriptor(self, stack: ExitStack, image: tuple[int, ...], out_channels: int, kernel: int, bias: bool,
                    residual: bool) -> _P:
        batch, height, width, channels = image
        destination = self._nhwc(stack, (batch, height, width, out_channels), _F32)
        weights = self._make(stack, "dnnl_memory_desc_create_with_tag", "dnnl_memory_desc_destroy", 4,
                             _dims(out_channels, channels, kernel, kernel), _BF16, _ANY)
        bias_desc = self._vector(stack, out_channels) if bias else None
        attr = self._make(stack, "dnnl_primitive_attr_create", "dnnl_primitive_attr_destroy")
        if residual:
            post_ops = self._make(stack, "dnnl_post_ops_create", "dnnl_post_ops_destroy")
            self._call("dnnl_post_ops_append_binary", post_ops, _BINARY_ADD, destination)
            self._call("dnnl_primitive_attr_set_post_ops", attr, post_ops)
        pad = kernel // 2
        return self._make(stack, "dnnl_convolution_forward_primitive_desc_create", "dnnl_primitive_desc_destroy",
                          self._engine, _FORWARD_INFERENCE, _DIRECT, self._nhwc(stack, image, _BF16), weights,
                          bias_desc, destination, _dims(1, 1), _dims(0, 0), _dims(pad, pad), _dims(pad, pad), attr)

    def conv2d(self, image: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None,
               out: np.ndarray) -> bool:
        """out (B, H, W, O fp32) = the stride-1 "same" convolution of image (B, H, W, C bf16 bits) by
        weight (O, k, k, C bf16 bits), + bias (O,) + residual (out's shape), either may be None.
        Returns False, having written nothing, where oneDNN has only its reference (scalar) form
        for this shape."""
        for array, dtype in ((image, np.uint16), (weight, np.uint16), (out, np.float32)):
            if array.dtype != dtype or not array.flags.c_contiguous:
                raise ValueError(f"conv2d takes C-contiguous arrays of {dtype.__name__}, not {array.dtype}")
        out_channels, kernel = weight.shape[0], weight.shape[1]
        with ExitStack() as stack:
            conv = self._descriptor(stack, image.shape, out_channels, kernel, bias is not None, residual is not None)
            if "ref" in self._implementation(conv):
                return False
            # A stream per call (a few µs): oneDNN's streams are not to be shared between threads.
            stream = self._make(stack, "dnnl_stream_create", "dnnl_stream_destroy", self._engine, _IN_ORDER)
            plain = self._nhwc(stack, weight.shape, _BF16)
            blocked_desc = self._lib.dnnl_primitive_desc_query_md(conv, _QUERY_WEIGHTS_MD, 0)
            blocked = np.empty(self._lib.dnnl_memory_desc_get_size(blocked_desc), np.uint8)
            reorder_desc = self._make(stack, "dnnl_reorder_primitive_desc_create", "dnnl_primitive_desc_destroy",
                                      plain, self._engine, _P(blocked_desc), self._engine, None)
            reorder = self._make(stack, "dnnl_primitive_create", "dnnl_primitive_destroy", reorder_desc)
            blocked_memory = self._memory(stack, _P(blocked_desc), blocked.ctypes.data)
            source = self._memory(stack, plain, weight.ctypes.data)
            self._run(stream, reorder, [(_FROM, source), (_TO, blocked_memory)])
            destination = self._nhwc(stack, out.shape, _F32)
            args = [(_SRC, self._memory(stack, self._nhwc(stack, image.shape, _BF16), image.ctypes.data)),
                    (_WEIGHTS, blocked_memory), (_DST, self._memory(stack, destination, out.ctypes.data))]
            if bias is not None:
                bias = np.ascontiguousarray(bias, np.float32)
                args.append((_BIAS, self._memory(stack, self._vector(stack, out_channels), bias.ctypes.data)))
            if residual is not None:
                residual = np.ascontiguousarray(residual, np.float32)
                args.append((_POST_OP_SRC1, self._memory(stack, destination, residual.ctypes.data)))
            self._run(stream, self._make(stack, "dnnl_primitive_create", "dnnl_primitive_destroy", conv), args)
        return True
