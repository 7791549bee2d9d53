"""Pattern/replacement pairs for Inductor's pattern matcher (registered by ``layerpass.passes.fusion``)."""
