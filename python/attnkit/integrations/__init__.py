"""Integrations with frameworks that call attention through a registry.

attnkit.integrations.transformers  Hugging Face transformers: register() adds the "attnkit"
                                   attention implementation (continuous batching too, as
                                   "attnkit" or transformers' deprecated "paged|attnkit").
The framework is an optional dependency, imported only when the submodule is.
"""
