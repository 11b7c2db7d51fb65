"""The quantized model before its weights: built on meta with quanto Linears swapped in by name.

Modules stay oblivious: every decision is made by module name and installed from outside (the QLinear
swap here, the `DequantQLinear` threshold, forward hooks that keep the embedding table on the CPU).
Also the helpers that put tensors into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.quantize import set_module_by_name
from optimum.quanto.tensor import QTensor
from torch import nn

from cogbatch.model.config import CogVLMConfig
from cogbatch.model.quant.linear import DequantQLinear
from cogbatch.model.quant.plan import LayerQuant
from cogbatch.model.quant.spec import QuantConfig

_QTYPES = {"int4": qint4, "int8": qint8}


def build_skeleton(
    model_cls: Callable[[CogVLMConfig], nn.Module], cfg: CogVLMConfig, plan: Mapping[str, LayerQuant]
) -> nn.Module:
    """The model on meta with every planned Linear already swapped for a (meta) DequantQLinear.

    quanto's `quantize()` walks every module per call; the swap is done here by name. The QLinear
    is built as quanto's `QLinear.qcreate` builds it, directly on meta (its `from_module` would then
    only re-attach the meta weight), and gets the group size quanto takes no argument for.
    """
    with torch.device("meta"):  # everything on meta; `materialize_buffers` recomputes the rotary buffers
        model = model_cls(cfg)
    for name, lp in plan.items():
        linear = model.get_submodule(name)
        qmodule = DequantQLinear(
            linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype,
            device="meta", weights=_QTYPES[lp.qtype], quantize_input=True,
        )  # fmt: skip
        qmodule.weight_group_size = lp.group_size if lp.qtype == "int4" else None
        qmodule.name = name
        set_module_by_name(model, name, qmodule)
    return model


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute the derived buffers (rotary frequencies) on `device`.

    Not `model.to(device)`: that would also move CPU-resident embeddings and walk every quantized
    weight through quanto's device-move path.
    """
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)) and hasattr(
            module, "reset_buffers"
        ):
            module.reset_buffers(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[name] = buf.to(device)


def check_no_meta(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on meta after loading: {', '.join(left[:5])}")


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a plain tensor in place of the meta parameter or buffer `name` (no copy, no cast)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if old is None or tuple(old.shape) != tuple(tensor.shape):
        found = None if old is None else tuple(old.shape)
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit the model's {found}")
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def assign_quantized(module: QModuleMixin, weight: QTensor, dtype: torch.dtype, device: torch.device) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.input_scale = torch.ones((), dtype=dtype, device=device)
    module.output_scale = torch.ones((), dtype=dtype, device=device)


def placement(name: str, quant: QuantConfig, device: torch.device) -> torch.device:
    """Where a tensor of the model goes: the device, or the host for the embedding table with embeddings_on_cpu."""
    if quant.embeddings_on_cpu and name == "model.embed_tokens.weight":
        return torch.device("cpu")
    return device


def offload_embeddings(model: nn.Module, device: torch.device) -> None:
    """Keep `model.embed_tokens` on the CPU: token ids go there for the lookup, rows come back to `device`.

    Done with forward hooks, so the embedding module and the code calling it stay unchanged.
    """
    emb = model.model.embed_tokens
    table_device = emb.weight.device

    def ids_to_table(module: nn.Module, args: tuple) -> tuple:
        return (args[0].to(table_device), *args[1:])

    def rows_to_device(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(device)

    emb.register_forward_pre_hook(ids_to_table)
    emb.register_forward_hook(rows_to_device)
