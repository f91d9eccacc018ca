"""chargpt: a character-level GPT, its checkpoint format and sampling, shared by the
trainer (``trainer/``) and the inference service (``server/``)."""
