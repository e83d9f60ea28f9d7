"""Every kind of learned thing the studio applies per request, its files, and the request plan they join.

word.py / word_files.py (Textual Inversion words), layer_word.py / layer_word_files.py (a word per layer, XTI / P+),
lora.py / lora_files.py / lora_export.py (LoRA files, applied per request), registry.py (from a file to the thing it
holds), plan.py (the `Learned` protocol and `RequestPlan`). docs/architecture.md, "How to add a kind of learned
thing", says how a new kind joins.
"""
