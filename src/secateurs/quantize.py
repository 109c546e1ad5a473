"""int8 dynamic quantization of a pruned model, its int8 file, and what it costs.

Dynamic quantization stores each Linear weight as int8 with one scale per tensor and
quantizes the activations on the fly at every call, so it needs no calibration data.
It runs on torch's own CPU kernels (`torch.ao.quantization.quantize_dynamic`, fbgemm or
x86 engine), which torch 2.13 still ships though it marks them deprecated in favour of
torchao. What works and what does not on CPU:

- Linear layers: quantized; weights take 1 byte instead of 4. The quantization is
  symmetric (zero point 0), so a pruned weight stays exactly zero in int8.
- Convolutions: not touched. Dynamic quantization has no conv kernel; int8 convs need
  static quantization (observers, calibration, conv-bn fusion), which is not done here.
- Sparse + int8: int8 weights are stored whole, zeros included (1 byte each): the
  1-bit-mask sparse form of `secateurs.io` packs float tensors only (the float layers
  left in the int8 file, convolutions, do take it). Past about 78% sparsity a sparse
  float weight (4 bytes per non-zero + 1 bit) is smaller than a dense int8 one.
  Structured pruning shrinks the layers themselves, so it composes with int8 fully.
- Latency: the int8 Linear kernel quantizes its input at every call; on small layers
  that overhead can cost more than the smaller weights save.
- A quantized model is not trained further: prune, fine-tune and distill come first.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save, save_file
from torch import nn

from .errors import IncompatibleLayer, WeightsMismatch
from .io import _encode as encode_state, load_state
from .measure import Measurement, count_macs, count_parameters, nonzero_macs, time_forward

_SCALE, _ZERO = ".weight_scale", ".weight_zero_point"


def _dynamic_linear() -> type[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return DynamicLinear


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Linear layers run as int8 dynamic-quantized layers on CPU."""
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise IncompatibleLayer("this torch build has no quantized CPU engine (fbgemm / x86 / qnnpack)")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise IncompatibleLayer("the model has no Linear layer: dynamic int8 quantization leaves convolutions as they are")
    with warnings.catch_warnings():
        # torch marks torch.ao.quantization deprecated; it is still the CPU kernel that runs
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    return quantized


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the int8 dynamic Linear layers in `model`."""
    kind = _dynamic_linear()
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A quantized model's weights as plain tensors: int8 weights, their scale and zero point, the rest as is."""
    kind = _dynamic_linear()
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, kind):
            weight, bias = module._packed_params._weight_bias()
            state[f"{name}.weight"] = weight.int_repr().contiguous()
            state[name + _SCALE] = torch.tensor(weight.q_scale(), dtype=torch.float64)
            state[name + _ZERO] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().contiguous()
    quantized = tuple(n + "." for n in quantized_layers(model))
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.startswith(quantized) and not key.endswith("_prune_mask"):
            state[key] = value.detach().contiguous()
    return state


def _encoded(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # float tensors left unquantized (convolutions) take the sparse form when it is smaller
    return encode_state(int8_state(model), sparse=True)


def int8_bytes(model: nn.Module) -> int:
    """Size of the quantized model as the file `save_int8` writes."""
    tensors, metadata = _encoded(model)
    return len(st_save(tensors, metadata=metadata))


def save_int8(model: nn.Module, path: Any) -> None:
    """Write a quantized model's `int8_state` to a safetensors file (float parts in sparse form)."""
    tensors, metadata = _encoded(model)
    save_file(tensors, str(path), metadata=metadata)


def load_int8(model: nn.Module, path: Any) -> nn.Module:
    """Quantize `model` (float, already pruned to the saved shapes) and load the int8 weights at `path`."""
    state = load_state(path)
    int8_keys = {k for k in state if k.endswith((_SCALE, _ZERO)) or state[k].dtype == torch.int8}
    layers = {k.rsplit(".", 1)[0] for k in int8_keys}
    # the float parts load into the float model first; the Linear layers take their int8 weights below
    floats = {k: v for k, v in state.items() if k not in int8_keys and k.rsplit(".", 1)[0] not in layers}
    result = model.load_state_dict(floats, strict=False)
    if result.unexpected_keys:
        raise WeightsMismatch(f"{path} holds tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
    quantized = quantize_int8(model)
    for name in quantized_layers(quantized):
        module = quantized.get_submodule(name)
        if f"{name}.weight" not in state or name + _SCALE not in state:
            raise WeightsMismatch(f"{path} has no int8 weight for layer {name}")
        raw = state[f"{name}.weight"]
        if raw.dtype != torch.int8 or tuple(raw.shape) != (module.out_features, module.in_features):
            raise WeightsMismatch(f"{path}: {name}.weight is {raw.dtype} {tuple(raw.shape)}, "
                                  f"expected int8 ({module.out_features}, {module.in_features})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            weight = torch._make_per_tensor_quantized_tensor(raw, float(state[name + _SCALE]),
                                                             int(state[name + _ZERO]))
        module.set_weight_bias(weight, state.get(f"{name}.bias"))
    return quantized


def measure_int8(quantized: nn.Module, float_model: nn.Module, example_inputs: Any, *, threads: int = 1,
                 repeats: int = 20, evaluate: Callable[[nn.Module], float] | None = None) -> Measurement:
    """Costs of the int8 model: bytes and latency of its own, counts and MACs of the float model it came from.

    Quantization does not change how many multiply-accumulates run, only their width,
    and zeros stay zeros. `size_bytes` is the file `save_int8` writes, `dense_size_bytes`
    the same tensors with no sparse form.
    """
    params, nonzeros = count_parameters(float_model)
    macs, per_module = count_macs(float_model, example_inputs)
    timing = time_forward(quantized, example_inputs, threads)
    return Measurement(
        params=params, nonzeros=nonzeros, macs=macs, nonzero_macs=nonzero_macs(float_model, per_module, macs),
        size_bytes=int8_bytes(quantized), dense_size_bytes=len(st_save(int8_state(quantized))),
        latency_ms=timing.median_ms, threads=threads, accuracy=evaluate(quantized) if evaluate else None,
        latency_iqr_ms=timing.iqr_ms, latency_runs=timing.runs)


__all__ = ["int8_bytes", "int8_state", "load_int8", "measure_int8", "quantize_int8", "quantized_layers", "save_int8"]
