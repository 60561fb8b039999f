"""SynFlow's data-free salience pass (Tanaka et al., 2020): the gradient of the linearised network's summed output
with respect to every targeted weight."""

from __future__ import annotations

import torch

from .backward import effective_weight, probe_backward
from .salience import GradientProbe

__all__ = ["synflow_statistics"]


def synflow_statistics(model, group, adapter_name, accumulation_dtype, statistics) -> int:
    """SynFlow's dR/dW on the linearised network, for the layers of ``group``; returns the probes' bytes.

    Linearised as in Tanaka et al. (2020): every parameter of the model replaced by its absolute value, dropout off,
    an all-ones input (``inputs_embeds``, one token), R = the sum of the outputs. Afterwards every parameter gets
    its sign back (``p[negative] *= -1`` is exact) and the model its train/eval mode. Numerical safety: with all
    weights positive the activations of a plain deep chain grow like the product of the layers' norms, but the
    pre-norm transformers this package targets re-normalise the residual stream in every block (RMSNorm /
    LayerNorm), so R stays finite in fp32; scores are only ranked, never used as magnitudes. A LayerNorm that sees
    the constant all-ones vector outputs its bias alone (the mean is subtracted), so for post-norm encoders the
    signal reaching deeper layers is weak: prefer another metric there.
    """

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = root.get_input_embeddings()
    if embeddings is None:
        raise ValueError("select_mask: selection='synflow' needs a model that accepts inputs_embeds")
    if any(type(p).__name__ == "Params4bit" for p in root.parameters()):
        # |W| of a packed 4-bit weight is not a 4-bit weight of the same quantisation (NF4/FP4 codes are not
        # symmetric bit patterns we could flip in place), so the network cannot be linearised exactly.
        raise ValueError(
            "select_mask: selection='synflow' cannot linearise a model with 4-bit (Params4bit) weights; choose a "
            "data-aware metric such as 'gradient', or run SynFlow on the unquantised model"
        )
    parameters = [p for p in root.parameters()]
    signs = [p.detach() < 0 for p in parameters]
    was_training = root.training
    was_trainable = []
    try:
        with torch.no_grad():
            for p in parameters:
                p.abs_()
        root.eval()
        for _, layer in group:
            layer.salience_probe = GradientProbe(layer.logical_shape, accumulation_dtype, layer.weight_device)
            values = layer.sparse_values[adapter_name]
            was_trainable.append(values.requires_grad)
            values.requires_grad_(True)
        weight = embeddings.weight
        ones = torch.ones((1, 1, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        outputs = model(inputs_embeds=ones)
        result = outputs.logits if getattr(outputs, "logits", None) is not None else outputs[0]
        values = [layer.sparse_values[adapter_name] for _, layer in group]
        probe_backward(model, result.float().sum(), values)
        probe_bytes = sum(layer.salience_probe.nbytes for _, layer in group)
        for stats, (_, layer) in zip(statistics, group):
            stats["grad"] = layer.salience_probe.grad
            stats["linearised_weight"] = effective_weight(layer, adapter_name).abs()
    finally:
        for (_, layer), trainable in zip(group, was_trainable):
            layer.salience_probe = None
            layer.sparse_values[adapter_name].requires_grad_(trainable)
        with torch.no_grad():
            for p, negative in zip(parameters, signs):
                p[negative] *= -1
        root.train(was_training)
    return probe_bytes
