"""Hugging Face vision-language models split into pipeline stages (needs the ``hf`` extra).

Nothing here is imported by ``import pp_media``; transformers is imported only by this layer.
"""
