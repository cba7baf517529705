"""Quantized modules and the module swap: the bridge from numeric formats to nn.Module (below methods/)."""
