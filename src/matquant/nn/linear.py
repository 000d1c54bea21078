"""MatQuantLinear: one int-c master weight (uint8 codes + group-wise α, z) that runs at any sliced precision."""
from __future__ import annotations

import torch
from torch import nn

from matquant.kernels import dispatch, torch_ref
from matquant.kernels.backend import Backend
from matquant.nn.master_storage import MasterStorage
from matquant.quant.minmax import QuantizedWeight, check_bits
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing, effective_code_bits


class MatQuantLinear(MasterStorage, nn.Module):
    """Drop-in replacement for nn.Linear holding MatQuant master codes.

    Buffers (saved in checkpoints): ``qweight`` uint8 [out, in], ``scales`` and ``zeros`` [out, in/group].
    ``set_bits(r)`` switches the precision in place; the dequantized weight of the current precision is
    cached (``cache_dequantized``) so repeated forwards cost one dense matmul.
    ``set_backend`` picks the compute path: one backend object (``compute_backend``; `kernels.dispatch`) that
    runs the forward and holds what it derives; ``backend`` is its name. Where the master codes live (``qweight``,
    packed planes, or dropped): `nn.master_storage`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 64,
        master_bits: int = 8,
        slicing: str = DEFAULT_SLICING,
        param_dtype: torch.dtype = torch.float16,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_bits(master_bits, "master bits")
        check_slicing(slicing)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size if group_size and group_size > 0 else in_features
        if in_features % self.group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        n_groups = in_features // self.group_size
        self.master_bits = master_bits
        self.bits = master_bits
        self.slicing = slicing
        self.compute_dtype = dtype or torch.float32
        self.cache_dequantized = True
        self.compute_backend: Backend = Backend()
        self.rotation: dict | None = None  # input rotation spec (quant/rotation.py); set_rotation
        self._input_rotation = None
        self.own_bits: tuple[int, ...] = ()  # slices with their own scales_int{r}/zeros_int{r} (add_slice_params)
        self.own_slicing = slicing
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=param_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=param_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._cached: tuple | None = None
        self._register_load_state_dict_pre_hook(self._drop_cache_hook)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, slicing: str = DEFAULT_SLICING, dtype=torch.float32
    ) -> "MatQuantLinear":
        out_f, in_f = qw.codes.shape
        m = cls(in_f, out_f, bias=bias is not None, group_size=qw.group_size, master_bits=qw.bits,
                slicing=slicing, param_dtype=qw.scales.dtype, device=qw.codes.device, dtype=dtype)
        m.qweight.copy_(qw.codes)
        m.scales.copy_(qw.scales)
        m.zeros.copy_(qw.zeros)
        if qw.slice_params:
            m.add_slice_params(sorted(qw.slice_params))
            for r, (sr, zr) in qw.slice_params.items():
                getattr(m, f"scales_int{r}").copy_(sr)
                getattr(m, f"zeros_int{r}").copy_(zr)
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    def quantized_weight(self) -> QuantizedWeight:
        own = {r: self.group_params(r) for r in self.own_bits} or None
        return QuantizedWeight(self.master_codes(), self.scales, self.zeros, self.master_bits, self.group_size, own)

    # ---- slice-own group parameters (quant/refit.refit_params, separate=True) ----
    def add_slice_params(self, bits_list) -> None:
        """Give the slices in `bits_list` (below the master) their own ``scales_int{r}``/``zeros_int{r}`` buffers
        (initialised to the shared values; a checkpoint load fills them). They are read for the slicing this layer
        was built with only; another slicing reads the shared ones."""
        for r in sorted({int(b) for b in bits_list}):
            check_bits(r, "slice-own parameter bits")
            if r >= self.master_bits:
                raise ValueError(f"slice-own parameters are for slices below the int{self.master_bits} master, "
                                 f"got int{r}.")
            self.register_buffer(f"scales_int{r}", self.scales.clone())  # (a meta skeleton's stay meta)
            self.register_buffer(f"zeros_int{r}", self.zeros.clone())
        self.own_bits = tuple(sorted(set(self.own_bits) | {int(b) for b in bits_list}))
        self.own_slicing = self.slicing
        self._cached = None
        self.compute_backend.clear()

    def code_tensor_names(self) -> tuple[str, ...]:
        """The state-dict leaves of the quantized weight: codes, shared and slice-own group parameters."""
        return ("qweight", "scales", "zeros", *(f"{p}_int{r}" for r in self.own_bits for p in ("scales", "zeros")))

    def group_params(self, bits: int | None = None, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) the `bits`-bit slice read with `mode` dequantizes with: its own where it has them (for
        the slicing they were fitted for), else the master's shared ones."""
        bits = self.bits if bits is None else bits
        mode = self.slicing if mode is None else mode
        if bits in self.own_bits and mode == self.own_slicing:
            return getattr(self, f"scales_int{bits}"), getattr(self, f"zeros_int{bits}")
        return self.scales, self.zeros

    # ---- precision ----
    def check_precision(self, bits: int, slicing: str | None = None) -> None:
        """Raise a clear error if this layer cannot run at (bits, slicing); changes nothing."""
        check_bits(bits)
        if bits > self.master_bits:
            raise ValueError(f"cannot run at {bits} bits: this layer's master codes have {self.master_bits} bits.")
        if slicing is not None:
            check_slicing(slicing)
        if self.master_dropped:
            mode = "paper" if bits >= self.master_bits else (slicing or self.slicing)
            resident = self.compute_backend.resident_precisions()
            if (bits, mode) not in resident:
                raise ValueError(
                    f"cannot switch to int{bits} ({mode} slicing): the model was loaded with keep_master=False, so "
                    f"the master codes are gone and only {', '.join(f'int{b} ({m})' for b, m in resident)} can run. "
                    "Reload with keep_master=True (8 bits/weight more) or add the precision to keep=[...].")

    def set_bits(self, bits: int, slicing: str | None = None) -> None:
        self.check_precision(bits, slicing)
        if slicing is not None:
            self.slicing = slicing
        if bits != self.bits or (self._cached and self._cached[0][1] != self.slicing):
            self._cached = None
        self.bits = bits

    @property
    def backend(self) -> str:
        """The name of the compute path (`set_backend`)."""
        return self.compute_backend.name

    def set_backend(self, backend: str, cache_precisions: int | None = None, layout: str | None = None,
                    keep=None, high_format: str | None = None) -> None:
        """Choose the compute path; results match the reference (a declined call falls back to it). Options not
        given keep their previous values: `cache_precisions` (cpu/triton), `keep` (packed: precisions kept packed
        side by side), `high_format` (packed: 'int4x2' or 'bf16' for r > 4); `layout`: see `nn.bits.set_backend`."""
        dispatch.check_backend(backend)
        if self.master_dropped:
            raise ValueError("this layer's master codes were dropped (keep_master=False): it can only run its packed "
                             "slices; reload the checkpoint with keep_master=True to change the backend.")
        options = self.compute_backend.options.updated(cache_precisions, layout, keep, high_format)
        if backend not in ("packed", "auto"):
            self.restore_master()
        self.compute_backend = dispatch.make_backend(backend, options)

    def effective_bits(self) -> float:
        """Bits per weight at the current precision: codes (+ E.P. overflow) + fp scales and zeros."""
        param_bits = (self.scales.element_size() + self.zeros.element_size()) * 8 / self.group_size
        return effective_code_bits(self.qweight, self.master_bits, self.bits, self.slicing) + param_bits

    # ---- compute ----
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        key = (self.bits, self.slicing, dtype, self.qweight.device)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        s, z = self.group_params()
        w = torch_ref.dequantize_slice(self.master_codes(), s, z, self.master_bits, self.bits, self.slicing, dtype)
        if self.cache_dequantized:
            self._cached = (key, w)
        return w

    def set_rotation(self, spec: dict | None) -> None:
        """Run with an online input rotation x -> x·V (its codes were quantized from W·V); None removes it. A
        'residual' spec has no online part (it is folded into the model's weights): the layer runs unrotated."""
        from matquant.quant.rotation import input_rotation, online_spec

        spec = online_spec(spec)
        self._input_rotation = input_rotation(spec, self.in_features)
        self.rotation = spec

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current slice as a plain [out, in] weight of the original input basis (rotation folded back)."""
        w = self.dequantized_weight(torch.float32)
        if self._input_rotation is not None:
            w = self._input_rotation.unrotate_weight(w)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._input_rotation is not None:  # every backend runs on the rotated input
            x = self._input_rotation(x)
        return self.compute_backend.forward(self, x)

    def derived_tensors(self):
        """(name, tensor) of what this layer holds beyond its parameters and buffers: the cached reference slice,
        the master codes held as packed planes, and what its backend holds (for `matquant.nn.memory`)."""
        if self._cached is not None:
            yield "_cached", self._cached[1]
        if self.master_planes is not None:
            for i, t in enumerate(self.master_planes.tensors()):
                yield f"master_planes.{i}", t
        for name, t in self.compute_backend.resident_tensors():
            yield f"compute_backend.{name}", t

    def _drop_cache_hook(self, *args, **kwargs):
        if self.master_dropped:
            raise ValueError("cannot load a state dict into a layer whose master codes were dropped "
                             "(keep_master=False); build a fresh model with matquant.load.")
        self.restore_master()
        self._cached = None
        self.compute_backend.clear()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"master_bits={self.master_bits}, bits={self.bits}, group_size={self.group_size}, "
                f"slicing={self.slicing}" + (f", backend={self.backend}" if self.backend != "torch" else "")
                + (f", rotation={self.rotation['mode']}" if self.rotation else "")
                + (f", own params int{'/'.join(map(str, self.own_bits))}" if self.own_bits else "")
                + (", master dropped" if self.master_dropped else "")
                + (", master held as packed planes" if self.master_planes is not None else ""))
