"""Which quantizable layers sit at the edges of the network's data flow.

EfficientQ keeps the *first* and *last* layers of a network at 8-bit weights with a float input (Zhang & Chung,
"EfficientQ: An efficient and accurate post-training neural network quantization method for medical image
segmentation", Medical Image Analysis 97, 2024: "first and last layers keep 8-bit weights and float input").
"First" and "last" are read off the data flow, not the call order, because segmentation networks branch:

* a layer is **first** when its input comes from the network's input without passing through another of the
  given layers (element-wise ops, padding, concatenation, reshapes, norms and activations may lie in between).
  In a MONAI ``UNet`` with residual units both ``model.0.residual`` and ``model.0.conv.unit0.conv`` read the
  image, so both are first;
* a layer is **last** when its output reaches the network's output without passing through another of the
  given layers (e.g. SegResNet's ``conv_final.2.conv``; in a residual MONAI ``UNet`` also the transposed
  convolution whose output the identity residual adds to the output).

The data flow is traced with autograd: one forward pass with grad enabled, on a ``meta`` copy of the network
(no memory, no compute) or, when that fails, on a real copy; a small network on a small input is traced on a real
copy and one sample first (cheaper than the meta device's per-operation overhead). Forward hooks record, for every
layer call, the ``grad_fn`` node of its output and of its input; the graph is then walked through
``next_functions``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

__all__ = ["edge_layers"]

_logger = logging.getLogger("monai_efficientq")

_Node = torch.autograd.graph.Node


class _Trace:
    """What the forward hooks saw: the layers in call order and the autograd nodes around them."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.out_nodes: dict[_Node, list[str]] = {}
        self.in_nodes: dict[str, list[_Node]] = {}
        self.output_node: _Node | None = None
        self.leaf: torch.Tensor | None = None
        self.graph = True  # False: traced without grad, the call order is all there is

    def record(self, name: str, args: tuple, output: object) -> None:
        """Record one call of layer ``name``: its input's and its output's ``grad_fn`` at this moment."""
        if name not in self.in_nodes:
            self.order.append(name)
            self.in_nodes[name] = []
        inp, out = first_tensor(args), first_tensor(output)
        if inp is not None and inp.grad_fn is not None:
            self.in_nodes[name].append(inp.grad_fn)
        if out is not None and out.grad_fn is not None:
            self.out_nodes.setdefault(out.grad_fn, []).append(name)


def first_tensor(value: object) -> torch.Tensor | None:
    """The first tensor in ``value``: itself, or the first one found in a (nested) list, tuple or dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor`` (a MONAI MetaTensor loses its metadata)."""
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def _meta_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` on the meta device, made without copying the weights' data first."""
    memo: dict[int, object] = {}
    for tensor in list(net.parameters()) + list(net.buffers()):
        if nn.parameter.is_lazy(tensor):
            continue
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(net, memo).to(torch.device("meta"))


def _traced_copy(net: nn.Module, meta: bool) -> nn.Module:
    """A copy of ``net`` ready for tracing: on the meta device or ``net``'s, eval mode, float weights requiring grad."""
    clone = _meta_copy(net) if meta else copy.deepcopy(net)
    clone.eval()
    for param in clone.parameters():
        if param.is_floating_point() or param.is_complex():
            param.requires_grad_(True)  # every layer output gets a node, even with frozen weights
    return clone


def _trace(net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], meta: bool, grad: bool = True) -> _Trace:
    """Run a copy of ``net`` once on (a stand-in for) ``x`` with hooks on the copy's ``layers``.

    Args:
        net: the network (left untouched: a copy runs).
        x: the network input.
        layers: the layers to watch, by their names in ``net``.
        meta: run on the meta device (an empty input of ``x``'s shape) instead of ``x``'s device.
        grad: record the autograd graph (``False``: only the call order).

    Returns:
        the recorded trace.
    """
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        clone = _traced_copy(net, meta)
        modules = dict(clone.named_modules(remove_duplicate=False))
        trace = _Trace()
        trace.graph = grad
        handles = [modules[name].register_forward_hook(_hook(trace, name)) for name in layers]
        try:
            source = torch.empty(x.shape, dtype=x.dtype, device="meta") if meta else _plain(x).detach().clone()
            trace.leaf = source.requires_grad_(grad)
            out = first_tensor(clone(trace.leaf.clone()))  # a non-leaf input: in-place ops on it stay legal
        finally:
            for handle in handles:
                handle.remove()
    trace.output_node = out.grad_fn if out is not None else None
    return trace


def _hook(trace: _Trace, name: str):
    """A forward hook recording the calls of layer ``name`` into ``trace``."""

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        trace.record(name, args, output)

    return hook


#: A network input of at most this many values per sample, for a network of at most
#: :data:`REAL_TRACE_MAX_WEIGHTS` weights, is traced on a real copy and one sample first: the meta device runs many
#: operations through Python decompositions (e.g. a trilinear upsampling), which takes about a second, far more
#: than a small real forward.
REAL_TRACE_MAX_VALUES = 2**18
#: See :data:`REAL_TRACE_MAX_VALUES` (a real copy copies the weights).
REAL_TRACE_MAX_WEIGHTS = 2**23


def _real_first(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether to trace on a real copy of ``net`` and one sample of ``x`` before trying the meta device."""
    if x.dim() == 0 or x.shape[0] == 0 or x[:1].numel() > REAL_TRACE_MAX_VALUES:
        return False
    return sum(p.numel() for p in net.parameters()) <= REAL_TRACE_MAX_WEIGHTS


def _run_trace(net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]) -> _Trace:
    """Trace on the meta device, then on failure on a real copy (for a small input and network: first on a real copy
    and one sample, then on the meta device); on failure again without grad (call order only)."""
    tries = [(False, x[:1]), (True, x)] if _real_first(net, x) else [(True, x), (False, x)]
    for meta, data in tries:
        try:
            return _trace(net, data, layers, meta=meta)
        except Exception as err:  # meta: data-dependent control flow, .item(), CPU-only ops; real: an op refusing grad
            kind = "meta" if meta else "real"
            _logger.debug("edge_layers: the %s forward failed (%s: %s).", kind, type(err).__name__, err)
            failure = err
    _logger.warning(
        "edge_layers: the forward with grad failed (%s: %s); first/last layers fall back to call order.",
        type(failure).__name__, failure,
    )
    return _trace(net, x, layers, meta=False, grad=False)


def _last_layers(trace: _Trace) -> set[str]:
    """The layers whose output node is reached from the output's node without crossing another layer's."""
    found: set[str] = set()
    if trace.output_node is None:
        return found
    stack, visited = [trace.output_node], {trace.output_node}
    while stack:
        node = stack.pop()
        if node in trace.out_nodes:
            found.update(trace.out_nodes[node])
            continue
        for parent, _ in node.next_functions:
            if parent is not None and parent not in visited:
                visited.add(parent)
                stack.append(parent)
    return found


def _reads_input(trace: _Trace, start: _Node) -> bool:
    """Whether the input leaf's ``AccumulateGrad`` node is reachable from ``start`` without crossing a layer output."""
    stack, visited = [start], {start}
    while stack:
        node = stack.pop()
        if node in trace.out_nodes:
            continue
        if getattr(node, "variable", None) is trace.leaf:
            return True
        for parent, _ in node.next_functions:
            if parent is not None and parent not in visited:
                visited.add(parent)
                stack.append(parent)
    return False


def _first_layers(trace: _Trace) -> set[str]:
    """The layers one of whose calls reads the network input without another layer in between."""
    return {name for name, nodes in trace.in_nodes.items() if any(_reads_input(trace, node) for node in nodes)}


def edge_layers(net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """The first and last layers of ``net``'s data flow among ``layers``.

    A layer is first when its input comes from the network input without passing through another layer of
    ``layers``, and last when its output reaches the network output (for a list/tuple/dict output, e.g. deep
    supervision: its first tensor) without passing through another layer of ``layers``. Layers never called
    are in neither list. The forward runs once on a meta-device copy of ``net`` (on a real copy if that raises; first
    on a real copy and one sample for a small input and network, see :data:`REAL_TRACE_MAX_VALUES`);
    ``net`` itself is not run, changed or hooked. If the autograd graph does not connect the input to any layer,
    or any layer to the output (e.g. an op that is not differentiable), that side falls back to the call order
    (the first, resp. last, layer called) and a warning is logged.

    Args:
        net: the network.
        x: an input batch for ``net`` (only its shape and dtype matter unless the meta forward fails).
        layers: the layers to classify, keyed by their names in ``net.named_modules()``.

    Returns:
        ``(first, last)``: names of ``layers`` in the order they are first called in the forward.

    Raises:
        KeyError: a key of ``layers`` is no submodule name of ``net``.
    """
    if not layers:
        return [], []
    names = {name for name, _ in net.named_modules(remove_duplicate=False)}
    missing = [name for name in layers if name not in names]
    if missing:
        raise KeyError(f"layers {missing} are no submodules of the network (keys: net.named_modules() names).")
    trace = _run_trace(net, x, layers)
    first, last = _first_layers(trace), _last_layers(trace)
    if trace.order and not first:
        if trace.graph:
            _logger.warning("edge_layers: no layer is connected to the input in the autograd graph; using call order.")
        first = {trace.order[0]}
    if trace.order and not last:
        if trace.graph:
            _logger.warning("edge_layers: no layer is connected to the output in the autograd graph; using call order.")
        last = {trace.order[-1]}
    return [n for n in trace.order if n in first], [n for n in trace.order if n in last]
