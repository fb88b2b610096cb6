"""Endor where users already are: transformers' `from_pretrained` (hf_quantizer), an
OpenAI-compatible server (server), plain HF checkpoints for the serving engines (export) and Hub
ids (hub). A layer above the runtime; nothing here is imported by `import endor` except
`lazy_hook`, which registers the transformers quantizer only once transformers itself loads."""
