"""Where a MatQuantLinear's master codes live: the uint8 ``qweight`` buffer (what checkpoints hold), the one packed
master layout (`kernels.master_planes.MasterPlanes`, the same 8 bits per weight, from which the packed backend cuts
every nested slice with at most one AND), or nowhere (dropped after packing: only resident packed slices run)."""
from __future__ import annotations

import torch
from torch import nn

from matquant.kernels.master_planes import pack_master, unpack_master


class MasterStorage(nn.Module):
    """Mixin of MatQuantLinear (it reads the layer's ``qweight``, ``code_tensor_names()``, ``compute_backend``)."""

    master_dropped = False  # drop_master(): qweight/scales/zeros freed, only packed slices remain
    master_planes = None  # hold_master_packed(): the codes as two packed 4-bit planes instead of qweight

    def drop_master(self) -> int:
        """Free the master codes, scales and zeros (replaced by shape-only meta tensors); only the packed slices
        already resident can run afterwards. Returns the bytes freed."""
        if self.backend not in ("packed", "auto") or not self.compute_backend.resident_precisions():
            raise ValueError("drop_master needs the packed backend with at least one precision packed "
                             "(set_backend('packed'), then prepare it: matquant.nn.memory.prepare_packed).")
        freed = 0
        for name in self.code_tensor_names():
            t = getattr(self, name)
            freed += t.numel() * t.element_size()
            setattr(self, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self._cached = None
        self.compute_backend.drop_dense_weights()
        self.master_dropped = True
        self.master_planes = None  # what the kept slices share of them stays alive through the slices
        return freed

    def master_codes(self) -> torch.Tensor:
        """The uint8 master codes [out, in] (unpacked from the planes when the master is held packed)."""
        if self.master_planes is None:
            return self.qweight
        return unpack_master(self.master_planes)

    def hold_master_packed(self) -> None:
        """Hold the master codes as two packed 4-bit planes (`kernels.master_planes.MasterPlanes`: the same 8 bits
        per weight) instead of the uint8 ``qweight`` (then a shape-only meta tensor): the packed backend cuts every
        nested slice from them with at most one AND, so `set_bits` costs ~nothing. state_dict() unpacks the codes
        on the fly; .to() another device, a non-packed backend and load_state_dict restore them (restore_master)."""
        if self.master_planes is not None:
            return
        if self.master_dropped:
            raise ValueError("this layer's master codes were dropped (keep_master=False); nothing to hold packed.")
        self.master_planes = pack_master(self.qweight, self.master_bits)
        self.qweight = torch.empty(self.qweight.shape, dtype=torch.uint8, device="meta")
        self._cached = None

    def restore_master(self) -> None:
        """Undo hold_master_packed: the uint8 codes back in ``qweight``, the planes freed."""
        if self.master_planes is not None:
            self.qweight = self.master_codes()
            self.master_planes = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.master_planes is not None:  # checkpoints always hold the uint8 codes
            destination[prefix + "qweight"] = self.master_codes()

    def _apply(self, fn, *args, **kwargs):
        self._cached = None
        if self.master_dropped:  # the packed slices are all that is left: keep them (CPU-only runtime)
            return self
        self.compute_backend.clear()
        if self.master_planes is not None:
            if fn(torch.empty(0, dtype=torch.uint8)).device.type != "cpu":
                self.restore_master()  # the planes are a CPU format: move the uint8 codes instead
            else:  # stays on CPU: the planes stay; fn must not touch the meta placeholder
                placeholder, self._buffers["qweight"] = self._buffers["qweight"], None
                try:
                    return super()._apply(fn, *args, **kwargs)
                finally:
                    self._buffers["qweight"] = placeholder
        return super()._apply(fn, *args, **kwargs)
